"""Parity of an exported ONNX model against the PyTorch fp32 model.

Bounds: fp32 ONNX max |diff| <= 1e-4; fp16 ONNX PSNR(fp16, fp32 reference) >= 45 dB with both
outputs clipped to [0, 1] (the range the runtime writes). Runs on ONNX Runtime (CPU), falling
back to ``onnx.reference`` where ONNX Runtime has no kernel for an op/dtype (tiny models only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

FP32_MAX_ABS = 1e-4
FP16_MIN_PSNR = 45.0


class ParityError(AssertionError):
    """The exported model does not reproduce the PyTorch model within the stated bound."""


@dataclass
class ParityReport:
    precision: str
    engine: str  # "onnxruntime" or "onnx.reference"
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    max_abs: float = 0.0
    min_psnr_db: float = math.inf
    bound: str = ""
    passed: bool = True

    def __str__(self) -> str:
        return (
            f"{self.precision} parity via {self.engine} on {len(self.shapes)} inputs: max|diff| {self.max_abs:.2e}, "
            f"min PSNR {self.min_psnr_db:.1f} dB (bound: {self.bound}) -> {'ok' if self.passed else 'FAILED'}"
        )


def structured_image(c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-looking test image (smooth gradients, a disc, edges, mild noise) in [0, 1], shape C,H,W."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 0.3 + 0.4 * (xx / max(w - 1, 1)) * (yy / max(h - 1, 1))
    img += 0.3 * (((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (min(h, w) / 3) ** 2)
    img += 0.1 * np.sin(xx / 3.0)
    img = np.repeat(img[None], c, 0) + rng.normal(0, 0.02, (c, h, w)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def default_inputs(channels: int, multiple: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """Random and structured inputs of several shapes: odd sizes (when the multiple allows) and batch > 1."""
    g = torch.Generator().manual_seed(seed)
    m = multiple
    out = [
        torch.rand(1, channels, 16 * m, 16 * m, generator=g),
        torch.rand(3, channels, 11 * m, 7 * m, generator=g),
        torch.from_numpy(structured_image(channels, 24 * m, 19 * m, seed))[None],
        torch.from_numpy(np.stack([structured_image(channels, 9 * m, 13 * m, s) for s in (1, 2)])),
    ]
    return out


def run_onnx(path: str | Path, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Run the model on CPU: ONNX Runtime if it can, else onnx.reference. Returns (output, engine)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return np.asarray(sess.run(None, {name: x.astype(np.float32)})[0]), "onnxruntime"
    except Exception as e:  # e.g. NOT_IMPLEMENTED for an fp16 kernel on this CPU build
        if "NOT_IMPLEMENTED" not in str(e) and "implementation" not in str(e).lower():
            raise
    import onnx
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(onnx.load(str(path)))
    return np.asarray(ev.run(None, {ev.input_names[0]: x.astype(np.float32)})[0]), "onnx.reference"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@torch.no_grad()
def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    *,
    precision: str = "fp32",
    inputs: list[torch.Tensor] | None = None,
    max_abs: float = FP32_MAX_ABS,
    min_psnr: float = FP16_MIN_PSNR,
    raise_on_fail: bool = True,
) -> ParityReport:
    """Compare ONNX output with ``model`` (fp32, CPU) on ``inputs`` (default: :func:`default_inputs`)."""
    model = model.float().eval()
    d = model.descriptor  # type: ignore[attr-defined]
    xs = inputs if inputs is not None else default_inputs(d.in_channels, d.size_multiple)
    bound = f"max|diff| <= {max_abs:g}" if precision == "fp32" else f"PSNR >= {min_psnr:g} dB"
    rep = ParityReport(precision=precision, engine="onnxruntime", bound=bound)
    for x in xs:
        ref = model(x.float()).numpy()
        out, rep.engine = run_onnx(onnx_path, x.numpy())
        rep.shapes.append(tuple(x.shape))
        if out.shape != ref.shape:
            rep.passed = False
            if raise_on_fail:
                raise ParityError(f"{onnx_path}: output shape {out.shape} != PyTorch {ref.shape} for input {tuple(x.shape)}")
            continue
        if not np.isfinite(out).all():
            rep.passed = False
            rep.max_abs = math.inf
            rep.min_psnr_db = -math.inf
            continue
        rep.max_abs = max(rep.max_abs, float(np.abs(out - ref).max()))
        rep.min_psnr_db = min(rep.min_psnr_db, psnr(out, ref))
    ok = rep.max_abs <= max_abs if precision == "fp32" else rep.min_psnr_db >= min_psnr
    rep.passed = rep.passed and ok
    if raise_on_fail and not rep.passed:
        raise ParityError(f"{onnx_path}: {rep}")
    return rep
