"""Seams at small tiles, worst case over many real crops (issue 24, item 5).

For each model, every 128x128 crop (several positions on several *training* radiographs of
shared/data/cxr-train; never the evaluation set) is upscaled whole (one tile, the reference) and through the
tiled runtime with the runtime's default overlap and halo for each tile size. Reports per (model, tile) the
worst and median PSNR of tiled vs whole (peak 1.0), the worst max error in 8-bit levels, and the cost of the
overlap: computed LR pixels / image pixels - 1 for a 2048^2 image (``plan_tiles``) and the measured
tiled / whole time on the crops.

    python benchmarks/seams/seam_crops.py ../shared/data/cxr-train --out benchmarks/results/seams
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from medsr.arch import fold_to_gray
from medsr.io import read_image, to_float
from medsr.runtime import TileConfig, TorchBackend, plan_tiles, upscale_array
from medsr.runtime.contract import default_halo
from medsr.weights import load_model

POSITIONS = [(0.3, 0.3), (0.5, 0.65), (0.7, 0.4)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--models", nargs="*", default=["realesrgan-x4plus", "medsr-cxr-x4"])
    ap.add_argument("--tiles", nargs="*", type=int, default=[64, 96])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/seams"))
    a = ap.parse_args()
    paths = sorted(a.folder.glob("*.png"))[: a.images]
    crops = []
    for p in paths:
        x = to_float(read_image(p))
        h, w = x.shape[:2]
        for fy, fx in POSITIONS:
            y0, x0 = int(fy * h) - a.size // 2, int(fx * w) - a.size // 2
            crops.append((f"{p.name}@{y0},{x0}", np.ascontiguousarray(x[y0 : y0 + a.size, x0 : x0 + a.size])))
    rows = []
    for name in a.models:
        lm = load_model(name)
        model = fold_to_gray(lm.model) if lm.descriptor.in_channels == 3 else lm.model
        b = TorchBackend(model, device="cpu")
        per_tile: dict[int, list[dict]] = {t: [] for t in a.tiles}
        for label, crop in crops:
            t0 = time.perf_counter()
            whole = upscale_array(b, crop, TileConfig(tile=a.size, overlap=0, batch=1))
            t_whole = time.perf_counter() - t0
            for t in a.tiles:
                cfg = TileConfig(tile=t)
                t0 = time.perf_counter()
                got = upscale_array(b, crop, cfg)
                dt = time.perf_counter() - t0
                r = {"model": name, "crop": label, "tile": t, "overlap": cfg.overlap, "halo": default_halo(cfg.overlap)
                     if cfg.halo is None else cfg.halo, "psnr": psnr(got, whole),
                     "max_levels": float(np.abs(got - whole).max() * 255), "time_ratio": dt / t_whole}
                per_tile[t].append(r)
                rows.append(r)
                print(json.dumps(r), flush=True)
        for t, rs in per_tile.items():
            cfg = TileConfig(tile=t)
            summary = {
                "model": name, "tile": t, "overlap": cfg.overlap, "crops": len(rs),
                "worst_psnr": min(r["psnr"] for r in rs), "median_psnr": statistics.median(r["psnr"] for r in rs),
                "worst_max_levels": max(r["max_levels"] for r in rs),
                "extra_px_2048": plan_tiles(2048, 2048, cfg).extra_pixel_ratio,
                "time_ratio_median": statistics.median(r["time_ratio"] for r in rs),
            }
            rows.append({"summary": summary})
            print("SUMMARY", json.dumps(summary), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "seam-crops.json").write_text(json.dumps({"images": [p.name for p in paths], "rows": rows}, indent=1))
    lines = ["| model | tile | overlap (default) | crops | worst PSNR tiled vs whole (dB) | median | worst max err (levels) "
             "| extra LR px, 2048² | tiled / whole time (median) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r.get("summary")
        if s:
            lines.append(f"| {s['model']} | {s['tile']} | {s['overlap']} | {s['crops']} | {s['worst_psnr']:.1f} | "
                         f"{s['median_psnr']:.1f} | {s['worst_max_levels']:.2f} | {s['extra_px_2048']:.0%} | "
                         f"{s['time_ratio_median']:.2f} |")
    (a.out / "seam-crops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
