"""Measurement primitives: wall-clock timing, host/GPU memory high-water, GEMM peak, FLOPs, error.

Everything here is small and dependency-light; torch and psutil are imported lazily.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------- FLOPs


def model_flops(descriptor: Any, lr_pixels: float) -> float:
    """Analytic FLOPs (2 x MACs) of one forward pass over ``lr_pixels`` LR input pixels."""
    from medsr.arch import rrdbnet_macs_per_lr_pixel

    return 2.0 * rrdbnet_macs_per_lr_pixel(descriptor) * float(lr_pixels)


# -------------------------------------------------------------------------------------------- timing


def synchronize(device: Any) -> None:
    """Wait for queued device work (no-op on CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass
class Timing:
    """Wall-clock seconds of each timed repeat (warm-up excluded)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.seconds))

    @property
    def best(self) -> float:
        return float(min(self.seconds))

    @property
    def stdev(self) -> float:
        return float(statistics.stdev(self.seconds)) if len(self.seconds) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "median_s": self.median, "best_s": self.best, "stdev_s": self.stdev}


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device: Any = "cpu") -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (device synchronised)."""
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    out: list[float] = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return Timing(out)


# -------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass
class MemoryWatch:
    """Context manager: host RSS high-water (sampled by a thread) and CUDA peak allocation.

    ``peak_rss`` is the highest sampled RSS (bytes); ``baseline_rss`` the RSS on entry, so
    ``peak_rss - baseline_rss`` is what the watched code added. ``peak_gpu`` is
    ``torch.cuda.max_memory_allocated`` (torch allocations only; ORT/TensorRT allocate outside it),
    or None without CUDA.
    """

    interval_s: float = 0.002
    device: Any = "cpu"
    baseline_rss: int = 0
    peak_rss: int = 0
    peak_gpu: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, int(proc.memory_info().rss))
            except psutil.Error:  # pragma: no cover - process accounting hiccup
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemoryWatch:
        import torch

        self.baseline_rss = rss_bytes()
        self.peak_rss = self.baseline_rss
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.peak_gpu = int(torch.cuda.max_memory_allocated(dev))

    @property
    def added_rss(self) -> int:
        return max(0, self.peak_rss - self.baseline_rss)


# ------------------------------------------------------------------------------------------ GEMM peak


#: square GEMM sizes tried for the reference peak (the best one counts): large enough to reach it
GEMM_SIZES = {"cpu": (1024, 2048, 3072), "cuda": (4096, 8192, 16384)}


def gemm_peak_tflops(device: Any = "cpu", precision: str = "fp32", n: int | None = None, repeats: int = 3) -> dict[str, Any]:
    """Achieved TFLOP/s of a square GEMM (n x n x n) in ``precision`` on ``device``; ``n`` None: the best over
    :data:`GEMM_SIZES` (a small GEMM does not reach the peak).

    The reference "peak" that model throughput is compared against: measured in the same process, under
    the same load, so the ratio is meaningful even on a busy machine. On the CPU the best of two GEMM
    libraries counts: ``torch.matmul`` (MKL / oneDNN) and OpenVINO's MatMul when installed, because MKL's fp32
    GEMM runs far below the hardware on some CPUs (AMD EPYC: 0.2 TFLOP/s, under the model's own convs).
    """
    import torch

    dev = torch.device(device)
    dtype = getattr(torch, _DTYPES[precision])
    best: dict[str, Any] = {}
    tried: dict[str, float] = {}
    for size in (n,) if n is not None else GEMM_SIZES["cuda" if dev.type == "cuda" else "cpu"]:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(size, size, generator=g).to(dev, dtype)
        b = torch.randn(size, size, generator=g).to(dev, dtype)
        runs = {"torch": lambda a=a, b=b: torch.matmul(a, b)}
        if dev.type == "cpu" and precision in ("fp32", "bf16"):
            ov_run = _openvino_matmul(a.float().numpy(), b.float().numpy(), precision)
            if ov_run is not None:
                runs["openvino"] = ov_run
        for lib, fn in runs.items():
            if dev.type == "cuda":  # fp32 is IEEE fp32 (TF32 off), tf32 its own precision
                from medsr.runtime.torch_backend import cuda_fp32_math

                with cuda_fp32_math(tf32=precision == "tf32"):
                    timing = time_call(fn, repeats=repeats, warmup=1, device=dev)
            else:
                timing = time_call(fn, repeats=repeats, warmup=1, device=dev)
            tflops = 2.0 * size**3 / timing.best / 1e12
            tried[f"{lib} n={size}"] = round(tflops, 4)
            if not best or tflops > best["tflops"]:
                best = {"device": dev.type, "precision": precision, "n": size, "library": lib, "tflops": tflops,
                        "best_s": timing.best}
        del a, b, runs
    best["tried"] = tried
    return best


def _openvino_matmul(a: np.ndarray, b: np.ndarray, precision: str) -> Callable[[], Any] | None:
    """A compiled OpenVINO MatMul (a @ b, b constant) in ``precision``; None without OpenVINO or native bf16."""
    try:
        import openvino as ov
        import openvino.opset13 as ops  # type: ignore[import-not-found]
    except ImportError:
        return None
    from medsr.runtime.openvino_backend import native_bf16

    if precision == "bf16" and not native_bf16():
        return None
    core = ov.Core()
    x = ops.parameter(list(a.shape), ov.Type.f32)
    model = ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x], "gemm")
    req = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                                            "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    return lambda: req.infer({0: a})


# --------------------------------------------------------------------------------------------- error


def error_stats(out: np.ndarray, ref: np.ndarray, clip: bool = True) -> dict[str, float]:
    """Max and mean abs difference, PSNR (dB, peak 1.0, all channels) of ``out`` against ``ref``, and the
    16-bit round trip: ``out`` quantised to uint16, written as a 16-bit PNG and read back, must be
    unchanged and within one 16-bit level per 1/255 of mean error of ``ref`` quantised the same way.

    ``clip``: compare within the image range [0, 1] (backends may clamp their output, some do not).
    """
    a = np.asarray(out, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if clip:
        a, b = np.clip(a, 0.0, 1.0), np.clip(b, 0.0, 1.0)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    diff = a - b
    mse = float(np.mean(diff * diff))
    return {
        "max_abs_err": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "mean_abs_err": float(np.mean(np.abs(diff))) if diff.size else 0.0,
        "psnr_db": math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse),
        "roundtrip16": png16_roundtrip(a),
    }


def png16_roundtrip(x: np.ndarray) -> bool:
    """``x`` in [0, 1] -> uint16 -> 16-bit PNG in memory -> back: identical (the output path medsr writes)."""
    import cv2

    q = np.rint(np.clip(x, 0.0, 1.0) * 65535.0).astype(np.uint16)
    q = q.reshape(-1, q.shape[-1]) if q.ndim > 2 else q  # channels side by side: one 2-D 16-bit image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(q))
    back = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else None
    return bool(back is not None and back.dtype == np.uint16 and np.array_equal(back.reshape(q.shape), q))


# ---------------------------------------------------------------------------------------------- data


def synthetic_radiograph(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic radiograph-like gray image in [0, 1] (H x W float32): smooth anatomy + edges + noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= max(1, h - 1)
    xx /= max(1, w - 1)
    img = 0.25 + 0.35 * np.exp(-(((xx - 0.3) / 0.18) ** 2 + ((yy - 0.5) / 0.35) ** 2))
    img += 0.35 * np.exp(-(((xx - 0.7) / 0.18) ** 2 + ((yy - 0.5) / 0.35) ** 2))
    for k in range(1, 9):  # rib-like bands
        img += 0.04 * np.sin(2 * np.pi * (k * 1.7 * yy + 0.3 * xx)) * np.exp(-k / 4)
    img[(np.abs(xx - 0.5) < 0.03)] += 0.2  # spine
    img += rng.normal(0.0, 0.01, size=(h, w)).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
