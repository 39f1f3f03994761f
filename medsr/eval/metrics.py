"""Image-quality metrics: PSNR and SSIM as BasicSR/Real-ESRGAN compute them.

Inputs are float arrays in [0, 1], H x W (gray) or H x W x 3 (RGB; measured on the Y channel
with ``y_channel=True``). ``crop`` pixels are removed from every border (the paper uses ``scale``).
"""

from __future__ import annotations

import numpy as np


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in [0, 1] (as MATLAB's rgb2ycbcr, used by BasicSR), from RGB in [0, 1]."""
    y = img[..., 0] * 65.481 + img[..., 1] * 128.553 + img[..., 2] * 24.966 + 16.0
    return (y / 255.0).astype(np.float64)


def _prepare(a: np.ndarray, b: np.ndarray, crop: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim == 3 and a.shape[2] == 1:
        a, b = a[..., 0], b[..., 0]
    if y_channel and a.ndim == 3 and a.shape[2] == 3:
        a, b = rgb_to_y(a), rgb_to_y(b)
    if crop:
        a = a[crop:-crop, crop:-crop]
        b = b[crop:-crop, crop:-crop]
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, crop: int = 0, y_channel: bool = True) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; ``inf`` for identical images."""
    a, b = _prepare(a, b, crop, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(1.0 / mse))


def _gaussian_filter(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.filter2D(img, -1, window, borderType=cv2.BORDER_REFLECT)[5:-5, 5:-5]


def _ssim_2d(a: np.ndarray, b: np.ndarray) -> float:
    import cv2

    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    a = a * 255.0
    b = b * 255.0
    k = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(k, k.transpose())
    mu1 = _gaussian_filter(a, window)
    mu2 = _gaussian_filter(b, window)
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    s1 = _gaussian_filter(a * a, window) - mu1_sq
    s2 = _gaussian_filter(b * b, window) - mu2_sq
    s12 = _gaussian_filter(a * b, window) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s1 + s2 + c2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, crop: int = 0, y_channel: bool = True) -> float:
    """Structural similarity (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5), mean over channels."""
    a, b = _prepare(a, b, crop, y_channel)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels after cropping, got {a.shape[:2]}")
    if a.ndim == 2:
        return _ssim_2d(a, b)
    return float(np.mean([_ssim_2d(a[..., c], b[..., c]) for c in range(a.shape[2])]))
