"""The evaluation protocol of Aghelan & Rouhani (fine-tuned Real-ESRGAN for medical images).

ground truth (cropped to a multiple of the scale) -> bicubic downsampling x s (MATLAB imresize,
antialiased) -> Gaussian blur (sigma configurable) -> [quantised to the source bit depth, as a saved
LR file would be] -> SR by each model and each baseline -> PSNR / SSIM on gray or the Y channel with
``scale`` pixels cropped from every border (+ LPIPS when an ``lpips`` package with weights loads).

Models are plain callables ``float32 H x W x C in [0,1] -> float32 sH x sW x C`` (``as_sr_function``
adapts a ``medsr.api.Upscaler``). The bicubic baseline is always evaluated: models are judged
against it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medsr.eval.baselines import BASELINES, SRFunction, cv2_resize, imresize, lanczos_resize, make_baseline
from medsr.eval.metrics import psnr, ssim
from medsr.io.image import SUPPORTED_SUFFIXES

#: Default Gaussian sigma (LR pixels) applied after bicubic downsampling; see docs/evaluation.md.
DEFAULT_SIGMA = 1.0


@dataclass(frozen=True)
class ProtocolConfig:
    """Settings of one evaluation run.

    ``kernel_size``: odd Gaussian kernel size; ``None`` -> ``2*ceil(3*sigma)+1``.
    ``down``: ``"matlab"`` (antialiased bicubic, BasicSR's imresize) or ``"cv2"`` (``cv2.INTER_CUBIC``).
    ``size``: resize ground truth to ``size x size`` (INTER_AREA / INTER_CUBIC) before anything else.
    ``crop_border``: pixels removed from every border for metrics; ``None`` -> ``scale``.
    ``quantize``: round LR and SR images to the source bit depth (8-bit source -> 1/255 steps), as
    writing them to image files does in the paper's pipeline.
    """

    scale: int = 4
    sigma: float = DEFAULT_SIGMA
    kernel_size: int | None = None
    down: str = "matlab"
    size: int | None = None
    crop_border: int | None = None
    quantize: bool = True
    baselines: tuple[str, ...] = tuple(BASELINES)
    lpips: bool = True
    #: GT resize filter with ``size``: "auto" (INTER_AREA down, INTER_CUBIC up) | "lanczos" (antialiased Lanczos-3)
    resample: str = "auto"
    #: metrics of RGB images on "y" (BT.601 luma, BasicSR's habit) or "rgb" (all three channels)
    color: str = "y"
    #: also PSNR inside a vessel mask of the truth (``medsr.eval.vessels``): the retina protocol
    vessels: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.resample not in ("auto", "lanczos"):
            raise ValueError(f"resample must be 'auto' or 'lanczos', got {self.resample!r}")
        if self.color not in ("y", "rgb"):
            raise ValueError(f"color must be 'y' or 'rgb', got {self.color!r}")

    @property
    def border(self) -> int:
        return self.scale if self.crop_border is None else self.crop_border

    def describe(self) -> str:
        k = self.kernel_size or gaussian_kernel_size(self.sigma)
        blur = f"Gaussian blur sigma={self.sigma:g} (kernel {k})" if self.sigma > 0 else "no blur"
        down = "MATLAB-style antialiased bicubic" if self.down == "matlab" else "cv2 INTER_CUBIC"
        filt = " (antialiased Lanczos-3)" if self.resample == "lanczos" else ""
        size = f"GT resized to {self.size}x{self.size}{filt}, " if self.size else ""
        color = "gray/Y" if self.color == "y" else "gray/RGB (all three channels)"
        name = f"{self.name} protocol: " if self.name else ""
        vessels = "; vessel PSNR inside a black-hat vessel mask of the truth's green channel" if self.vessels else ""
        return (
            f"{name}{size}x{self.scale}: {down} downsampling, then {blur}; metrics on {color}, "
            f"border crop {self.border}px{', LR/SR quantised to source bit depth' if self.quantize else ''}{vessels}"
        )


#: The retina protocol of the source paper (DRIVE): GT = the whole image resized to 512 x 512 with
#: Lanczos, LR = bicubic x2 down then Gaussian blur, SR x2; PSNR/SSIM here on RGB, plus vessel PSNR.
RETINA_SIZE = 512


def retina_config(sigma: float = DEFAULT_SIGMA, **kw: Any) -> ProtocolConfig:
    """The retina protocol (x2, 512 x 512 Lanczos GT, RGB metrics, vessel PSNR) at blur ``sigma``."""
    opts: dict[str, Any] = dict(
        scale=2, sigma=sigma, size=RETINA_SIZE, resample="lanczos", color="rgb", vessels=True, name="retina",
        baselines=("bicubic", "lanczos"),
    )
    opts.update(kw)
    return ProtocolConfig(**opts)


@dataclass
class Method:
    name: str
    fn: SRFunction
    kind: str = "model"  # "model" | "baseline"


@dataclass
class Sample:
    """One image's arrays (H x W x C float32), kept for the figure."""

    image: str
    gt: np.ndarray
    lr: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)
    mask: np.ndarray | None = None  # vessel mask of the truth (retina protocol)


@dataclass
class EvalResult:
    records: list[dict[str, Any]]
    config: ProtocolConfig
    methods: list[str]
    sample: Sample | None = None
    lpips_available: bool = False
    #: methods that could not run (name -> why), reported as "not available" rows
    unavailable: dict[str, str] = field(default_factory=dict)


# --- degradation ----------------------------------------------------------------------------------


def gaussian_kernel_size(sigma: float) -> int:
    return 2 * int(math.ceil(3.0 * sigma)) + 1 if sigma > 0 else 1


def as_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 2:
        return img[..., None]
    if img.ndim != 3:
        raise ValueError(f"expected an H x W or H x W x C image, got shape {img.shape}")
    return img


def prepare_gt(img: np.ndarray, scale: int, size: int | None = None, resample: str = "auto") -> np.ndarray:
    """Float ground truth H x W x C: optionally resized to ``size``^2, cropped to a multiple of ``scale``.

    ``resample``: "auto" (INTER_AREA when shrinking, INTER_CUBIC when enlarging) or "lanczos"
    (antialiased Lanczos-3, :func:`medsr.eval.baselines.lanczos_resize`).
    """
    img = as_hwc(img)
    if size:
        h, w = img.shape[:2]
        if resample == "lanczos":
            img = np.clip(as_hwc(lanczos_resize(img, (size, size))), 0.0, 1.0)
        elif resample == "auto":
            interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
            img = np.clip(cv2_resize(img, (size, size), interp), 0.0, 1.0)
        else:
            raise ValueError(f"unknown resample {resample!r} (auto or lanczos)")
    h, w = img.shape[:2]
    h2, w2 = h - h % scale, w - w % scale
    if h2 == 0 or w2 == 0:
        raise ValueError(f"image {h}x{w} is smaller than the scale {scale}")
    return np.ascontiguousarray(img[:h2, :w2])


def gaussian_blur(img: np.ndarray, sigma: float, kernel_size: int | None = None) -> np.ndarray:
    if sigma <= 0:
        return as_hwc(img)
    k = kernel_size or gaussian_kernel_size(sigma)
    if k % 2 == 0 or k < 1:
        raise ValueError(f"Gaussian kernel size must be odd and positive, got {k}")
    g = cv2.getGaussianKernel(k, sigma, cv2.CV_64F).astype(np.float32)
    img = as_hwc(img)
    out = np.stack(
        [cv2.sepFilter2D(np.ascontiguousarray(img[..., c]), cv2.CV_32F, g, g, borderType=cv2.BORDER_REFLECT_101)
         for c in range(img.shape[2])],
        axis=-1,
    )
    return out


def quantize(img: np.ndarray, levels: int | None) -> np.ndarray:
    """Round to ``levels`` steps (255 for 8-bit); ``None`` leaves the values alone. Always clips to [0,1]."""
    img = np.clip(img, 0.0, 1.0)
    if levels:
        img = np.round(img * levels) / levels
    return img.astype(np.float32)


def degrade(
    gt: np.ndarray,
    scale: int,
    sigma: float = DEFAULT_SIGMA,
    kernel_size: int | None = None,
    down: str = "matlab",
    levels: int | None = None,
) -> np.ndarray:
    """GT (H x W x C, H and W multiples of ``scale``) -> LR (H/s x W/s x C) in [0, 1]. Deterministic."""
    gt = as_hwc(gt)
    h, w = gt.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"ground truth {h}x{w} is not a multiple of the scale {scale} (use prepare_gt)")
    out_hw = (h // scale, w // scale)
    if down == "matlab":
        lr = as_hwc(imresize(gt, out_hw))
    elif down == "cv2":
        lr = cv2_resize(gt, out_hw, cv2.INTER_CUBIC)
    else:
        raise ValueError(f"unknown downsampling {down!r} (matlab or cv2)")
    lr = gaussian_blur(np.clip(lr, 0.0, 1.0), sigma, kernel_size)
    return quantize(lr, levels)


# --- models -----------------------------------------------------------------------------------------


def as_sr_function(model: Any) -> SRFunction:
    """A plain callable for a model: an ``Upscaler``-like object (``.up``) or a callable."""
    up = getattr(model, "up", None)
    if callable(up):
        return up
    if callable(model):
        return model
    raise TypeError(f"not a model: {type(model).__name__} has neither .up() nor __call__")


def run_model(fn: SRFunction, lr: np.ndarray, gt_shape: tuple[int, ...]) -> np.ndarray:
    """Call ``fn`` on LR and bring the result to GT's H x W x C layout, clipped to [0, 1]."""
    out = np.asarray(fn(np.ascontiguousarray(lr, dtype=np.float32)))
    if out.dtype == np.uint8:
        out = out.astype(np.float32) / 255.0
    elif out.dtype == np.uint16:
        out = out.astype(np.float32) / 65535.0
    out = as_hwc(out)
    c = gt_shape[2]
    if out.shape[2] != c:
        if c == 1 and out.shape[2] == 3:
            out = out.mean(axis=2, keepdims=True)
        elif c == 3 and out.shape[2] == 1:
            out = np.repeat(out, 3, axis=2)
        else:
            raise ValueError(f"model returned {out.shape[2]} channels for a {c}-channel image")
    if out.shape[:2] != tuple(gt_shape[:2]):
        raise ValueError(
            f"model output is {out.shape[0]}x{out.shape[1]}, expected {gt_shape[0]}x{gt_shape[1]} "
            f"(from LR {lr.shape[0]}x{lr.shape[1]}): is the model's scale the protocol's scale?"
        )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# --- LPIPS (optional) -------------------------------------------------------------------------------

_LPIPS: Any = None
_LPIPS_TRIED = False


def lpips_model() -> Any:
    """An ``lpips.LPIPS(net='alex')`` if the package and its weights load offline, else ``None``."""
    global _LPIPS, _LPIPS_TRIED
    if not _LPIPS_TRIED:
        _LPIPS_TRIED = True
        try:
            import lpips  # type: ignore[import-not-found]

            _LPIPS = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception:  # package missing, or weights not downloadable offline
            _LPIPS = None
    return _LPIPS


def lpips_distance(model: Any, a: np.ndarray, b: np.ndarray, crop: int = 0) -> float:
    import torch

    def t(x: np.ndarray) -> torch.Tensor:
        x = as_hwc(x)
        if crop:
            x = x[crop:-crop, crop:-crop]
        if x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None] * 2 - 1

    with torch.no_grad():
        return float(model(t(a), t(b)).item())


# --- protocol ---------------------------------------------------------------------------------------


def build_methods(models: dict[str, Any] | Sequence[tuple[str, Any]], config: ProtocolConfig) -> list[Method]:
    """Baselines (bicubic always included) followed by the models, with unique names."""
    names = list(config.baselines)
    if "bicubic" not in names:
        names.append("bicubic")
    methods = [Method(n, make_baseline(n, config.scale), "baseline") for n in BASELINES if n in names]
    for n in names:
        if n not in BASELINES:
            raise ValueError(f"unknown baseline {n!r}; choose from {', '.join(BASELINES)}")
    items = list(models.items()) if isinstance(models, dict) else list(models)
    taken = {m.name for m in methods}
    for name, model in items:
        label, i = name, 2
        while label in taken:
            label, i = f"{name}-{i}", i + 1
        taken.add(label)
        methods.append(Method(label, as_sr_function(model), "model"))
    return methods


def evaluate_image(
    name: str,
    gt: np.ndarray,
    methods: Sequence[Method],
    config: ProtocolConfig,
    levels: int | None = 255,
    lpips_net: Any = None,
    keep: bool = False,
    on_method: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], Sample | None]:
    """Run every method on one ground-truth image; one record per method."""
    gt = prepare_gt(gt, config.scale, config.size, config.resample)
    lv = levels if config.quantize else None
    if lv:
        gt = quantize(gt, lv)
    lr = degrade(gt, config.scale, config.sigma, config.kernel_size, config.down, lv)
    y = gt.shape[2] == 3 and config.color == "y"
    vmask = None
    if config.vessels:
        from medsr.eval.vessels import vessel_mask

        vmask = vessel_mask(gt)
    b = config.border
    sample = Sample(name, gt, lr, mask=vmask) if keep else None
    records = []
    for m in methods:
        if on_method:
            on_method(m.name)
        t0 = time.perf_counter()
        sr = run_model(m.fn, lr, gt.shape)
        dt = time.perf_counter() - t0
        sr = quantize(sr, lv)
        p, s = psnr(sr, gt, crop=b, y_channel=y), ssim(sr, gt, crop=b, y_channel=y)
        lp = lpips_distance(lpips_net, sr, gt, b) if lpips_net is not None else float("nan")
        rec = {"image": name, "method": m.name, "kind": m.kind, "height": gt.shape[0], "width": gt.shape[1],
               "channels": gt.shape[2], "psnr": p, "ssim": s, "lpips": lp, "seconds": dt}
        if vmask is not None:
            from medsr.eval.vessels import masked_psnr

            rec["vessel_psnr"] = masked_psnr(sr, gt, vmask, crop=b)
        records.append(rec)
        if sample is not None:
            sample.outputs[m.name] = sr
            sample.scores[m.name] = (p, s)
    return records, sample


def evaluate(
    images: Iterable[tuple[str, np.ndarray, int | None]],
    models: dict[str, Any] | Sequence[tuple[str, Any]],
    config: ProtocolConfig | None = None,
    progress: bool = False,
    total: int | None = None,
    unavailable: dict[str, str] | None = None,
) -> EvalResult:
    """Evaluate models and baselines on ``(name, gt_float_HWC, levels)`` images (levels: 255, 65535, None).

    The first image's arrays are kept (``result.sample``) for the comparison figure. ``unavailable``:
    methods that could not be loaded (name -> reason), carried to the report as "not available" rows.
    """
    config = config or ProtocolConfig()
    methods = build_methods(models, config)
    net = lpips_model() if config.lpips else None
    records: list[dict[str, Any]] = []
    sample = None
    it: Iterable[tuple[str, np.ndarray, int | None]] = images
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(images, total=total, unit="img", desc="medsr-eval")
        it = bar
    for i, (name, gt, levels) in enumerate(it):
        on_method = (lambda mname, _n=name: bar.set_postfix_str(f"{_n}: {mname}")) if bar is not None else None
        recs, smp = evaluate_image(name, gt, methods, config, levels, net, keep=(i == 0), on_method=on_method)
        records.extend(recs)
        if smp is not None:
            sample = smp
        if bar is not None:
            line = "  ".join(f"{r['method']} {r['psnr']:.2f}/{r['ssim']:.4f}" for r in recs)
            bar.write(f"{name}: {line}")
    if bar is not None:
        bar.close()
    return EvalResult(records, config, [m.name for m in methods], sample, net is not None, dict(unavailable or {}))


# --- reading a folder ---------------------------------------------------------------------------------


def list_images(data_dir: str | Path, limit: int | None = None) -> list[Path]:
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"not a directory: {d}")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    return files[:limit] if limit else files


def load_image(path: str | Path) -> tuple[np.ndarray, int | None]:
    """Float32 H x W x C in [0, 1] and the quantisation levels of the source (255, 65535, None).

    Uses ``medsr.io`` (``read_image`` + ``to_float``) when available; falls back to OpenCV.
    """
    try:
        from medsr.io import read_image, to_float  # type: ignore[attr-defined]
    except ImportError:
        read_image = to_float = None  # type: ignore[assignment]
    if read_image is not None and to_float is not None:
        img = read_image(path)
        arr = to_float(img)
        mv = int(getattr(img, "max_value", 0) or 0)
        levels = mv if np.issubdtype(img.pixels.dtype, np.integer) and mv > 0 else None
        return as_hwc(arr), levels
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"cannot read image {path}")
    if raw.ndim == 3:
        raw = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB if raw.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if raw.dtype == np.uint8:
        return as_hwc(raw.astype(np.float32) / 255.0), 255
    if raw.dtype == np.uint16:
        return as_hwc(raw.astype(np.float32) / 65535.0), 65535
    return as_hwc(np.clip(raw.astype(np.float32), 0, 1)), None


def iter_folder(paths: Sequence[Path]) -> Iterator[tuple[str, np.ndarray, int | None]]:
    for p in paths:
        arr, levels = load_image(p)
        yield p.name, arr, levels
