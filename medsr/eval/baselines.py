"""Interpolation baselines and the degradation resampler.

Baselines upscale the LR image back to the ground-truth size with ``cv2.resize`` (nearest, bilinear,
bicubic, Lanczos-4) and clip to [0, 1]. ``imresize`` is MATLAB's ``imresize`` (bicubic, a = -0.5,
antialiased when shrinking), the resampler BasicSR/Real-ESRGAN use to make LR test images.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

SRFunction = Callable[[np.ndarray], np.ndarray]

#: Baseline name -> OpenCV interpolation flag (upscaling LR -> GT size).
BASELINES: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _as_hwc(img: np.ndarray) -> np.ndarray:
    return img[..., None] if img.ndim == 2 else img


def cv2_resize(img: np.ndarray, out_hw: tuple[int, int], interpolation: int) -> np.ndarray:
    """``cv2.resize`` to (H, W), keeping an H x W x C layout (OpenCV drops a trailing channel of 1)."""
    img = _as_hwc(np.ascontiguousarray(img, dtype=np.float32))
    h, w = out_hw
    if img.shape[2] <= 4:
        out = cv2.resize(img, (w, h), interpolation=interpolation)
    else:  # OpenCV resizes at most 4 channels at once
        out = np.stack([cv2.resize(img[..., c], (w, h), interpolation=interpolation) for c in range(img.shape[2])], -1)
    return _as_hwc(out)


def upscale_baseline(lr: np.ndarray, method: str, out_hw: tuple[int, int]) -> np.ndarray:
    """Upscale ``lr`` (H x W x C float in [0, 1]) to ``out_hw`` with a named baseline, clipped to [0, 1]."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")
    return np.clip(cv2_resize(lr, out_hw, BASELINES[method]), 0.0, 1.0)


def make_baseline(method: str, scale: int) -> SRFunction:
    """A plain SR callable (float H x W x C -> float sH x sW x C) for a baseline."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")

    def fn(lr: np.ndarray) -> np.ndarray:
        return upscale_baseline(lr, method, (lr.shape[0] * scale, lr.shape[1] * scale))

    fn.__name__ = method
    return fn


# --- MATLAB imresize (bicubic, antialiased) --------------------------------------------------------


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


def _lanczos3(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


def _resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True, kernel: str = "cubic") -> np.ndarray:
    """Dense (out_len x in_len) matrix of MATLAB imresize's weights (bicubic or Lanczos-3), symmetric borders."""
    kernel_width = 4.0 if kernel == "cubic" else 6.0
    fn = _cubic if kernel == "cubic" else _lanczos3
    if scale < 1 and antialias:
        kernel_width /= scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    p = int(np.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(p)[None, :]  # 1-based source positions
    dist = u[:, None] - idx
    w = scale * fn(scale * dist) if (scale < 1 and antialias) else fn(dist)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])  # symmetric padding
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    m = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.repeat(np.arange(out_len), p)
    np.add.at(m, (rows, src.ravel()), w.ravel())
    return m


def imresize(img: np.ndarray, out_hw: tuple[int, int], antialias: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, [H W], 'bicubic')`` for float H x W (x C) arrays (no clipping)."""
    img = np.asarray(img, dtype=np.float64)
    h, w = img.shape[:2]
    oh, ow = out_hw
    mh = _resize_matrix(h, oh, oh / h, antialias)
    mw = _resize_matrix(w, ow, ow / w, antialias)
    if img.ndim == 2:
        return (mh @ img @ mw.T).astype(np.float32)
    return np.einsum("ih,hwc,jw->ijc", mh, img, mw, optimize=True).astype(np.float32)


def lanczos_resize(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """MATLAB ``imresize(img, [H W], 'lanczos3')``: Lanczos-3, antialiased when shrinking (the kernel is
    stretched by 1/scale, as PIL's ``Image.LANCZOS`` does), float H x W (x C) in, float32 out (no clipping).

    Unlike ``cv2.INTER_LANCZOS4``, which samples a fixed 8-tap kernel and aliases on large downscales
    (3410 -> 512 px folds fine vessels into moire), this filters before it decimates.
    """
    img = np.asarray(img, dtype=np.float64)
    h, w = img.shape[:2]
    oh, ow = out_hw
    mh = _resize_matrix(h, oh, oh / h, True, "lanczos3")
    mw = _resize_matrix(w, ow, ow / w, True, "lanczos3")
    if img.ndim == 2:
        return (mh @ img @ mw.T).astype(np.float32)
    tmp = np.einsum("ih,hwc->iwc", mh, img, optimize=True)
    return np.einsum("iwc,jw->ijc", tmp, mw, optimize=True).astype(np.float32)
