"""Scaling with image size through the tiled runtime, and runtime overhead over pure model time.

Time should grow linearly with LR pixels (R^2 of a least-squares line close to 1) and the working
memory (host RSS above the input and the preallocated output) should stay flat: bounded by one strip
of tiles, not by the image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from medsr.bench.measure import MemoryWatch, Timing, synchronize, synthetic_radiograph, time_call

MB = 1024.0 * 1024.0


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = slope * x + intercept`` and its coefficient of determination R^2."""
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.size < 2 or xa.shape != ya.shape:
        raise ValueError("linear_fit needs two equally long sequences of at least 2 points")
    slope, intercept = np.polyfit(xa, ya, 1)
    pred = slope * xa + intercept
    ss_res = float(np.sum((ya - pred) ** 2))
    ss_tot = float(np.sum((ya - ya.mean()) ** 2))
    tiny = 1e-12 * max(1.0, float(np.sum(ya * ya)))
    if ss_tot <= tiny:  # constant y: a flat line explains it fully
        r2 = 1.0 if ss_res <= tiny else 0.0
    else:
        r2 = 1.0 - ss_res / ss_tot
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2)}


def make_input(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """H x W x C float32 radiograph-like image in [0, 1] (gray replicated to ``channels``)."""
    g = synthetic_radiograph(h, w, seed)[..., None]
    return np.ascontiguousarray(np.repeat(g, channels, axis=2))


def _runtime() -> Any:
    import medsr.runtime as rt

    for name in ("TileConfig", "plan_tiles", "upscale_array"):
        if not hasattr(rt, name):
            raise ImportError(f"medsr.runtime.{name} is not available")
    return rt


def _upscale(rt: Any, backend: Any, img: np.ndarray, config: Any, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return rt.upscale_array(backend, img, config)
    return rt.upscale_array(backend, img, config, out=out)


def _alloc_out(img: np.ndarray, scale: int) -> np.ndarray:
    h, w, c = img.shape
    out = np.empty((h * scale, w * scale, c), dtype=np.float32)
    out.fill(0.0)  # make the pages resident, so they are in the baseline and not counted as working memory
    return out


def run_scaling(backend: Any, sizes: Sequence[tuple[int, int]], config: Any, repeats: int = 2) -> dict[str, Any]:
    """Best-of-``repeats`` time and working memory of ``upscale_array`` for each LR (h, w) in ``sizes``."""
    rt = _runtime()
    points: list[dict[str, Any]] = []
    use_out = True
    h0, w0 = sizes[0]
    _upscale(rt, backend, make_input(h0, w0, backend.channels), config, None)  # warm-up: same tile shape for all
    for h, w in sizes:
        img = make_input(h, w, backend.channels)
        out = _alloc_out(img, backend.scale) if use_out else None
        plan = rt.plan_tiles(h, w, config, backend.tile_limits())
        best = math.inf
        with MemoryWatch(device=backend.device) as mem:
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                try:
                    _upscale(rt, backend, img, config, out)
                except TypeError:  # an upscale_array without out=: count its output analytically
                    use_out, out = False, None
                    _upscale(rt, backend, img, config, None)
                synchronize(backend.device)
                best = min(best, time.perf_counter() - t0)
        out_bytes = 0 if use_out else h * w * backend.scale**2 * backend.channels * 4
        s = backend.scale
        strip_bytes = backend.descriptor.out_channels * plan.tile_hw[0] * s * plan.padded_hw[1] * s * 4
        points.append(
            {
                "lr_hw": [h, w],
                "lr_mpix": h * w / 1e6,
                "seconds": best,
                "num_tiles": int(plan.num_tiles),
                "extra_pixel_ratio": float(plan.extra_pixel_ratio),
                "working_mb": max(0, mem.added_rss - out_bytes) / MB,
                "strip_mb": strip_bytes / MB,  # one HR strip accumulator (float32, C x tile*s x W*s)
                "peak_rss_mb": mem.peak_rss / MB,
                "peak_gpu_mb": None if mem.peak_gpu is None else mem.peak_gpu / MB,
            }
        )
        del img, out
    mp = [p["lr_mpix"] for p in points]
    result: dict[str, Any] = {
        "tile": getattr(config, "tile", None),
        "overlap": getattr(config, "overlap", None),
        "batch": getattr(config, "batch", None),
        "points": points,
        "time_fit": linear_fit(mp, [p["seconds"] for p in points]),
        "memory_fit": linear_fit(mp, [p["working_mb"] for p in points]),
        "max_working_per_strip": max(p["working_mb"] / p["strip_mb"] for p in points),
        "output_mb_largest": max(p["lr_mpix"] for p in points) * 1e6 * backend.scale**2 * backend.channels * 4 / MB,
    }
    if points[0].get("peak_gpu_mb") is not None:
        result["gpu_memory_fit"] = linear_fit(mp, [p["peak_gpu_mb"] for p in points])
    return result


def measure_overhead(backend: Any, h: int, w: int, config: Any, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """End-to-end ``upscale_array`` time over pure ``backend.run`` time on the same tiles and batches."""
    import torch

    rt = _runtime()
    plan = rt.plan_tiles(h, w, config, backend.tile_limits())
    th, tw = plan.tile_hw
    n = int(plan.num_tiles)
    batch = max(1, int(getattr(config, "batch", 1) or 1))
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.rand(b, backend.channels, th, tw, generator=g).to(backend.device) for b in set(sizes)}

    def model_only() -> None:
        for b in sizes:
            backend.run(inputs[b])

    img = make_input(h, w, backend.channels)

    def end_to_end() -> None:
        rt.upscale_array(backend, img, config)

    # interleaved A/B repeats and best-of: robust to load from other processes drifting over time
    for _ in range(max(0, warmup)):
        model_only()
        end_to_end()
    model_s: list[float] = []
    e2e_s: list[float] = []
    for _ in range(max(1, repeats)):
        model_s += time_call(model_only, repeats=1, warmup=0, device=backend.device).seconds
        e2e_s += time_call(end_to_end, repeats=1, warmup=0, device=backend.device).seconds
    model_t, e2e_t = Timing(model_s), Timing(e2e_s)
    return {
        "lr_hw": [h, w],
        "tile": getattr(config, "tile", None),
        "overlap": getattr(config, "overlap", None),
        "halo": getattr(config, "halo", None),
        "batch": batch,
        "tile_hw": [int(th), int(tw)],
        "num_tiles": n,
        "extra_pixel_ratio": float(plan.extra_pixel_ratio),
        "model_s": model_t.best,
        "end_to_end_s": e2e_t.best,
        "model_median_s": model_t.median,
        "end_to_end_median_s": e2e_t.median,
        "overhead_ratio": e2e_t.best / model_t.best if model_t.best > 0 else math.nan,
    }


def default_plan_overheads(backend: Any, sizes: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """Tiles and extra-pixel ratio of the default TileConfig for reference LR sizes (planning only, no compute)."""
    rt = _runtime()
    cfg = rt.TileConfig()
    out = []
    for h, w in sizes:
        plan = rt.plan_tiles(h, w, cfg, backend.tile_limits())
        out.append(
            {
                "lr_hw": [h, w],
                "tile": getattr(cfg, "tile", None),
                "overlap": getattr(cfg, "overlap", None),
                "num_tiles": int(plan.num_tiles),
                "tile_hw": [int(x) for x in plan.tile_hw],
                "extra_pixel_ratio": float(plan.extra_pixel_ratio),
            }
        )
    return out
