"""Real-ESRGAN's second-order degradation model in batched torch (runs on the training device).

A port of ``RealESRGANModel.feed_data`` (Real-ESRGAN) and the ``*_pt`` helpers of
``basicsr/data/degradations.py``: blur -> random resize -> Gaussian/Poisson noise -> JPEG, twice,
then the final sinc filter and JPEG in random order, 8-bit quantisation, a paired random crop and the
training-pair pool. Blur kernels are drawn per sample in the data-loader workers (``kernels.py``);
everything else is drawn here from a numpy ``Generator`` (per-batch choices, as Real-ESRGAN) and a
``torch.Generator`` on the device (per-sample noise levels and the noise itself), so one seed fixes
the whole degradation.

JPEG: Real-ESRGAN uses DiffJPEG (a differentiable torch JPEG). It is never differentiated through
here, so each image is instead round-tripped through OpenCV's libjpeg (``cv2.imencode`` /
``cv2.imdecode``, 4:2:0 chroma subsampling for colour, plain gray JPEG for 1-channel images) on the
host, in a thread pool. This is a real JPEG codec (8-bit, integer quality) and costs one device->host
->device copy of the batch per JPEG stage (two per iteration); see docs/training.md.

Grayscale: 1-channel batches get single-channel (gray) noise and gray JPEG; 3-channel batches get
colour or gray noise (``gray_noise_prob``) exactly as Real-ESRGAN.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn import functional as F

RESIZE_MODES = ("area", "bilinear", "bicubic")
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="medsr-jpeg")
    return _POOL


def _pad(img: torch.Tensor, p: int) -> torch.Tensor:
    mode = "reflect" if min(img.shape[-2:]) > p else "replicate"
    return F.pad(img, (p, p, p, p), mode=mode)


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve ``img`` [B,C,H,W] with one kernel [k,k] / [1,k,k] or one per sample [B,k,k] (reflect pad)."""
    k = kernel.shape[-1]
    b, c, h, w = img.shape
    x = _pad(img, k // 2)
    ph, pw = x.shape[-2:]
    kernel = kernel.to(img)
    if kernel.dim() == 2 or kernel.shape[0] == 1:
        out = F.conv2d(x.reshape(b * c, 1, ph, pw), kernel.reshape(1, 1, k, k))
    else:
        wk = kernel.reshape(b, 1, k, k).repeat(1, c, 1, 1).reshape(b * c, 1, k, k)
        out = F.conv2d(x.reshape(1, b * c, ph, pw), wk, groups=b * c)
    return out.reshape(b, c, h, w)


class USMSharp(torch.nn.Module):
    """Unsharp masking of the ground truth (BasicSR ``USMSharp``: radius 50 -> 51-tap Gaussian, sigma 8).

    The 2-D Gaussian is separable, so it is applied as two 1-D passes (same result up to rounding).
    """

    def __init__(self, radius: int = 50, sigma: float = 0) -> None:
        super().__init__()
        if radius % 2 == 0:
            radius += 1
        k = cv2.getGaussianKernel(radius, sigma).astype(np.float32).reshape(-1)
        self.register_buffer("kernel", torch.from_numpy(k), persistent=False)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel.to(x)
        n = k.numel()
        y = _pad(x, n // 2).reshape(b * c, 1, h + n - 1, w + n - 1)
        y = F.conv2d(y, k.reshape(1, 1, 1, n))
        y = F.conv2d(y, k.reshape(1, 1, n, 1))
        return y.reshape(b, c, h, w)

    def forward(self, img: torch.Tensor, weight: float = 0.5, threshold: float = 10) -> torch.Tensor:
        residual = img - self._blur(img)
        mask = (torch.abs(residual) * 255 > threshold).to(img)
        soft_mask = self._blur(mask)
        sharp = torch.clamp(img + weight * residual, 0, 1)
        return soft_mask * sharp + (1 - soft_mask) * img


def _to_gray(img: torch.Tensor) -> torch.Tensor:
    if img.shape[1] == 1:
        return img
    w = img.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True)


def gaussian_noise(img: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise with std ``sigma``/255 per sample; samples with ``gray`` = 1 get the same noise in all channels."""
    b, c, h, w = img.shape
    s = sigma.view(b, 1, 1, 1) / 255.0
    noise = torch.randn(img.shape, generator=gen, device=img.device, dtype=img.dtype) * s
    if c > 1 and bool(gray.any()):
        g = gray.view(b, 1, 1, 1)
        noise_gray = torch.randn((b, 1, h, w), generator=gen, device=img.device, dtype=img.dtype) * s
        noise = noise * (1 - g) + noise_gray * g
    return noise


def _poisson(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    img = torch.clamp((img * 255.0).round(), 0, 255) / 255.0
    vals = [2 ** np.ceil(np.log2(max(2, len(torch.unique(img[i]))))) for i in range(img.shape[0])]
    v = img.new_tensor(vals).view(-1, 1, 1, 1)
    return torch.poisson(img * v, generator=gen) / v - img


def poisson_noise(img: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shot noise as BasicSR ``generate_poisson_noise_pt`` (levels = next power of two of the unique values)."""
    b, c, h, w = img.shape
    noise = _poisson(img, gen)
    if c > 1 and bool(gray.any()):
        g = gray.view(b, 1, 1, 1)
        noise_gray = _poisson(_to_gray(img), gen).expand(b, c, h, w)
        noise = noise * (1 - g) + noise_gray * g
    return noise * scale.view(b, 1, 1, 1)


def _uniform(b: int, lo: float, hi: float, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(b, generator=gen, device=like.device, dtype=like.dtype) * (hi - lo) + lo


def add_random_noise(
    img: torch.Tensor, rng: np.random.Generator, gen: torch.Generator, p_gauss: float, sigma_range: Any,
    poisson_range: Any, gray_prob: float,
) -> torch.Tensor:
    b = img.shape[0]
    gray = (torch.rand(b, generator=gen, device=img.device) < gray_prob).to(img.dtype)
    if rng.uniform() < p_gauss:
        noise = gaussian_noise(img, _uniform(b, *sigma_range, img, gen), gray, gen)
    else:
        noise = poisson_noise(img, _uniform(b, *poisson_range, img, gen), gray, gen)
    return torch.clamp(img + noise, 0, 1)


def _jpeg_one(x: np.ndarray, q: int) -> np.ndarray:
    if x.shape[2] == 3:
        x = x[:, :, ::-1]  # RGB -> BGR for OpenCV
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(x), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    y = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if y.ndim == 2:
        return y[:, :, None]
    return y[:, :, ::-1]


def jpeg_compress(img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip of every image in the batch at its own quality (host libjpeg via OpenCV)."""
    q = [int(round(float(v))) for v in quality.cpu()]
    x = torch.clamp(img.detach() * 255.0, 0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = list(_pool().map(_jpeg_one, list(x), q)) if len(q) > 1 else [_jpeg_one(x[0], q[0])]
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    if img.device.type == "cuda":
        y = y.pin_memory().to(img.device, non_blocking=True)
    return y.to(img.dtype) / 255.0


def _random_resize(
    out: torch.Tensor, rng: np.random.Generator, prob: Any, rng_range: Any, size: tuple[int, int] | None = None,
    base: tuple[int, int] | None = None,
) -> torch.Tensor:
    kind = int(rng.choice(3, p=np.asarray(prob, dtype=np.float64) / np.sum(prob)))
    if kind == 0:
        s = float(rng.uniform(1, rng_range[1]))
    elif kind == 1:
        s = float(rng.uniform(rng_range[0], 1))
    else:
        s = 1.0
    mode = RESIZE_MODES[int(rng.integers(3))]
    if base is None:
        h, w = out.shape[-2:]
    else:
        h, w = base
    new = (max(1, int(h * s)), max(1, int(w * s)))
    return _interp(out, new, mode)


def _interp(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class RealESRGANDegrader:
    """Synthesise LQ batches from GT batches with Real-ESRGAN's high-order degradation model."""

    def __init__(self, opts: dict[str, Any], scale: int) -> None:
        self.o = opts
        self.scale = scale

    @torch.no_grad()
    def __call__(
        self,
        gt: torch.Tensor,
        kernel1: torch.Tensor,
        kernel2: torch.Tensor,
        sinc: torch.Tensor,
        rng: np.random.Generator,
        gen: torch.Generator,
        usm: USMSharp | None = None,
    ) -> torch.Tensor:
        """``gt`` [B,C,H,W] in [0,1]; kernels [B,21,21]. Returns LQ [B,C,H/scale,W/scale] (8-bit levels)."""
        o, b = self.o, gt.shape[0]
        ori_h, ori_w = gt.shape[-2:]
        src = usm(gt) if usm is not None else gt
        # ----- first degradation
        out = filter2d(src, kernel1)
        out = _random_resize(out, rng, o["resize_prob"], o["resize_range"])
        out = add_random_noise(out, rng, gen, o["gaussian_noise_prob"], o["noise_range"], o["poisson_scale_range"], o["gray_noise_prob"])
        out = jpeg_compress(out, _uniform(b, *o["jpeg_range"], out, gen))
        # ----- second degradation
        if rng.uniform() < o["second_blur_prob"]:
            out = filter2d(out, kernel2)
        out = _random_resize(out, rng, o["resize_prob2"], o["resize_range2"], base=(ori_h // self.scale, ori_w // self.scale))
        out = add_random_noise(out, rng, gen, o["gaussian_noise_prob2"], o["noise_range2"], o["poisson_scale_range2"], o["gray_noise_prob2"])
        lq_size = (ori_h // self.scale, ori_w // self.scale)
        if rng.uniform() < 0.5:
            # resize back + final sinc, then JPEG
            out = _interp(out, lq_size, RESIZE_MODES[int(rng.integers(3))])
            out = filter2d(out, sinc)
            out = jpeg_compress(out, _uniform(b, *o["jpeg_range2"], out, gen))
        else:
            # JPEG, then resize back + final sinc
            out = jpeg_compress(out, _uniform(b, *o["jpeg_range2"], out, gen))
            out = _interp(out, lq_size, RESIZE_MODES[int(rng.integers(3))])
            out = filter2d(out, sinc)
        return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


def paired_random_crop(
    gt: torch.Tensor, lq: torch.Tensor, gt_size: int, scale: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random aligned crop for the whole batch (BasicSR ``paired_random_crop``)."""
    lq_size = gt_size // scale
    h, w = lq.shape[-2:]
    if h < lq_size or w < lq_size:
        raise ValueError(f"LQ {h}x{w} is smaller than the patch {lq_size}x{lq_size}")
    top = int(rng.integers(0, h - lq_size + 1))
    left = int(rng.integers(0, w - lq_size + 1))
    lq = lq[..., top : top + lq_size, left : left + lq_size]
    gt = gt[..., top * scale : top * scale + gt_size, left * scale : left * scale + gt_size]
    return gt, lq


class PairPool:
    """Real-ESRGAN's training-pair pool (``_dequeue_and_enqueue``): mixes degradations across batches.

    Per-batch choices (resize scale, noise type, ...) are shared within a batch; the pool shuffles
    pairs from ``size / batch`` past batches. Its contents are part of the checkpoint (exact resume).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.lq: torch.Tensor | None = None
        self.gt: torch.Tensor | None = None
        self.ptr = 0

    def __call__(self, lq: torch.Tensor, gt: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        b = lq.shape[0]
        size = (self.size // b) * b
        if size <= b:
            return lq, gt
        if self.lq is None or self.lq.shape[0] != size or self.lq.shape[1:] != lq.shape[1:]:
            self.lq = lq.new_zeros((size, *lq.shape[1:]))
            self.gt = gt.new_zeros((size, *gt.shape[1:]))
            self.ptr = 0
        assert self.gt is not None
        if self.ptr == size:
            idx = torch.randperm(size, generator=gen, device=gen.device).to(lq.device)
            self.lq, self.gt = self.lq[idx], self.gt[idx]
            lq_out, gt_out = self.lq[:b].clone(), self.gt[:b].clone()
            self.lq[:b], self.gt[:b] = lq, gt
            return lq_out, gt_out
        self.lq[self.ptr : self.ptr + b] = lq
        self.gt[self.ptr : self.ptr + b] = gt
        self.ptr += b
        return lq, gt

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "lq": self.lq, "gt": self.gt, "ptr": self.ptr}

    def load_state_dict(self, sd: dict[str, Any], device: torch.device | str) -> None:
        self.size = int(sd["size"])
        self.lq = None if sd["lq"] is None else sd["lq"].to(device)
        self.gt = None if sd["gt"] is None else sd["gt"].to(device)
        self.ptr = int(sd["ptr"])
