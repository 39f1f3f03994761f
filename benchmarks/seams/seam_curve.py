"""Seam curve: tiled output vs whole-image output, over overlap and halo, for each shipped model.

Real data: a 128x128 crop from the centre of a training chest X-ray (shared/data/cxr-train; never the
evaluation set). Whole-image inference is the reference; each (tile, overlap, halo) runs the tiled runtime.
Reports PSNR (peak 1.0), max error and worst column-mean error in 8-bit grey levels, and the extra-pixel
cost (computed LR pixels / image pixels - 1) of the plan on a 2048^2 image at tile 256 and 64.

    python benchmarks/seams/seam_curve.py ../shared/data/cxr-train/00000427_000.png --out benchmarks/results/seams
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from medsr.arch import fold_to_gray
from medsr.io import read_image, to_float
from medsr.runtime import TileConfig, TorchBackend, plan_tiles, upscale_array
from medsr.weights import load_model

CONFIGS = [(16, 4), (16, 8), (24, 6), (24, 8), (24, 12), (32, 8), (32, 12), (32, 16), (48, 12), (48, 16), (48, 24)]
MODELS = ["realesrgan-x4plus", "medsr-cxr-x4", "medsr-cxr-x4-fast"]


def metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((d**2).mean())
    col = d.mean(axis=(0, 2)) if d.ndim == 3 else d.mean(axis=0)
    row = d.mean(axis=(1, 2)) if d.ndim == 3 else d.mean(axis=1)
    return {
        "psnr": 99.0 if mse == 0 else 10 * math.log10(1.0 / mse),
        "max_levels": float(d.max() * 255),
        "worst_line_mean_levels": float(max(col.max(), row.max()) * 255),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--out", default="benchmarks/results/seams")
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--tiles", nargs="*", type=int, default=[64, 96])
    ap.add_argument("--at", default="0.35,0.3", help="crop centre as fractions of (height, width): a rib/lung region")
    ap.add_argument("--configs", nargs="*", default=None, help="overlap:halo pairs (default: the full grid)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    img = to_float(read_image(args.image))
    h, w = img.shape[:2]
    fy, fx = (float(v) for v in args.at.split(","))
    cy, cx = int(h * fy), int(w * fx)
    crop = np.ascontiguousarray(img[cy - 64 : cy + 64, cx - 64 : cx + 64, :1])
    grid = CONFIGS if not args.configs else [tuple(int(v) for v in c.split(":")) for c in args.configs]
    rows = []
    for name in args.models:
        lm = load_model(name)
        model = fold_to_gray(lm.model) if lm.descriptor.in_channels == 3 else lm.model
        b = TorchBackend(model, device="cpu")
        t0 = time.perf_counter()
        whole = upscale_array(b, crop, TileConfig(tile=128, overlap=0, batch=1))
        t_whole = time.perf_counter() - t0
        for tile in args.tiles:
            for overlap, halo in grid:
                if 2 * overlap > tile or 2 * halo > overlap:
                    continue
                cfg = TileConfig(tile=tile, overlap=overlap, halo=halo, batch=4)
                t0 = time.perf_counter()
                got = upscale_array(b, crop, cfg)
                dt = time.perf_counter() - t0
                cost = {f"extra_2048_t{t}": plan_tiles(2048, 2048, TileConfig(tile=t, overlap=overlap, halo=halo)).extra_pixel_ratio
                        for t in (64, 256)}
                row = {"model": name, "tile": tile, "overlap": overlap, "halo": halo, **metrics(got, whole), **cost,
                       "seconds": round(dt, 2), "whole_seconds": round(t_whole, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(args.models) if len(args.models) == 1 else "all"
    (out / f"seams-{tag}.json").write_text(json.dumps({"image": Path(args.image).name, "crop": f"128x128 at {args.at}", "rows": rows},
                                               indent=1))
    lines = ["| model | tile | overlap | halo | PSNR vs whole (dB) | max err (levels) | worst line mean (levels) "
             "| extra px 2048² @256 | @64 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tile']} | {r['overlap']} | {r['halo']} | {r['psnr']:.1f} | "
                     f"{r['max_levels']:.2f} | {r['worst_line_mean_levels']:.3f} | {r['extra_2048_t256']:.1%} | "
                     f"{r['extra_2048_t64']:.1%} |")
    (out / f"seams-{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
