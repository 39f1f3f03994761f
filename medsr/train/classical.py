"""Classical degradation for fidelity training: downscale, Gaussian blur, mild noise, optional JPEG.

Real-ESRGAN's high-order model (``degradations.py``) teaches a generator to remove heavy, unknown
damage; a fidelity model for radiographs that were only downsampled (or acquired at low resolution)
learns better from the simple forward model that such images actually went through::

    GT crop (HR, with a margin) -> downscale x s (MATLAB bicubic | area | bilinear, drawn per sample)
        -> Gaussian blur in LR pixels (sigma drawn from a range) -> Gaussian / Poisson noise (mild)
        -> optional JPEG -> quantise to 8 bit -> drop the margin (no border artefacts in the crop)

Ranges live in the ``classical`` config section (see ``config.py``, docs/training.md). Each sample is
degraded independently on the host, from a numpy ``Generator`` seeded by ``(seed, iteration, slot)``,
so a resumed run sees exactly the pairs an uninterrupted one would. The paper's evaluation protocol
(MATLAB bicubic x4, then Gaussian blur sigma 1.0, 8-bit) lies inside the default ranges; the
evaluation images themselves are never part of training.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from medsr.eval.baselines import imresize
from medsr.eval.protocol import gaussian_blur

DOWN_MODES = ("bicubic", "area", "bilinear")


def _downscale(img: np.ndarray, scale: int, mode: str) -> np.ndarray:
    h, w = img.shape[:2]
    oh, ow = h // scale, w // scale
    if mode == "bicubic":  # antialiased, as MATLAB imresize (the evaluation protocol's downscaler)
        out = imresize(img, (oh, ow))
    elif mode == "area":
        out = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_AREA)
    elif mode == "bilinear":
        out = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)
    else:
        raise ValueError(f"unknown downscale mode {mode!r} ({', '.join(DOWN_MODES)})")
    return np.asarray(out, dtype=np.float32).reshape(oh, ow, img.shape[2])


def margin(opts: dict[str, Any]) -> int:
    """LR pixels cut from each side after degrading, so blur borders never reach the training crop."""
    return int(math.ceil(3.0 * max(opts["blur_sigma"]))) + 2


def classical_degrade(gt: np.ndarray, scale: int, opts: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Float32 GT H x W x C in [0, 1] (H, W multiples of ``scale``) -> LR H/s x W/s x C in [0, 1]."""
    modes = list(opts["down"])
    probs = np.asarray(opts["down_prob"], dtype=np.float64)
    lr = _downscale(gt, scale, modes[int(rng.choice(len(modes), p=probs / probs.sum()))])
    if rng.uniform() < float(opts["blur_prob"]):
        lo, hi = opts["blur_sigma"]
        sigma = float(rng.uniform(lo, hi))
        if sigma > 0:
            lr = gaussian_blur(lr, sigma)
    lr = np.clip(lr, 0.0, 1.0)
    if rng.uniform() < float(opts["noise_prob"]):
        if rng.uniform() < float(opts["poisson_prob"]):
            lo, hi = opts["poisson_scale"]  # s: photon counts per unit intensity are 255 / s
            s = float(rng.uniform(lo, hi))
            if s > 0:
                peak = 255.0 / s
                lr = rng.poisson(lr * peak).astype(np.float32) / peak
        else:
            lo, hi = opts["noise_sigma"]
            s = float(rng.uniform(lo, hi)) / 255.0
            lr = lr + rng.normal(0.0, s, lr.shape).astype(np.float32)
        lr = np.clip(lr, 0.0, 1.0)
    if rng.uniform() < float(opts["jpeg_prob"]):
        lo, hi = opts["jpeg_range"]
        q = int(rng.integers(int(lo), int(hi) + 1))
        u8 = np.round(lr * 255.0).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", u8 if u8.shape[2] == 1 else u8[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:  # pragma: no cover - OpenCV always encodes uint8 arrays
            raise RuntimeError("JPEG encoding failed")
        dec = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        dec = dec[:, :, None] if dec.ndim == 2 else dec[:, :, ::-1]
        lr = dec.astype(np.float32) / 255.0
    if opts["quantize"]:
        lr = np.round(lr * 255.0) / 255.0
    return np.ascontiguousarray(lr, dtype=np.float32)


def validate_opts(opts: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the bad key of a ``classical`` section."""
    if not opts["down"] or any(m not in DOWN_MODES for m in opts["down"]):
        raise ValueError(f"classical.down must list modes from {', '.join(DOWN_MODES)}")
    if len(opts["down_prob"]) != len(opts["down"]) or min(opts["down_prob"]) < 0 or sum(opts["down_prob"]) <= 0:
        raise ValueError("classical.down_prob needs one non-negative weight per classical.down mode")
    for key in ("blur_sigma", "noise_sigma", "poisson_scale", "jpeg_range"):
        lo, hi = opts[key]
        if lo < 0 or hi < lo:
            raise ValueError(f"classical.{key} must be a range [lo, hi] with 0 <= lo <= hi")
    for key in ("blur_prob", "noise_prob", "poisson_prob", "jpeg_prob"):
        if not 0.0 <= float(opts[key]) <= 1.0:
            raise ValueError(f"classical.{key} must be a probability in [0, 1]")
    if opts["jpeg_prob"] > 0 and not (1 <= opts["jpeg_range"][0] <= opts["jpeg_range"][1] <= 100):
        raise ValueError("classical.jpeg_range must lie in [1, 100]")
