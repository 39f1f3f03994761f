"""Visual check on real thick-slice volumes (no truth along the thick axis): the volume path with its default
plan (isotropic at the in-plane spacing), shown in the two planes that contain the thick axis: input (nearest),
cubic B-spline, the model. Also prints the plan and the time.

usage: python benchmarks/volumes_visual.py VOLUME.nii.gz OUT.png [--model medsr-mr-tp] [--window LO,HI]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("volume", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="medsr-mr-tp")
    ap.add_argument("--window", help="display window LO,HI in the volume's units (default: min, p99.5)")
    a = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medsr.api import Upscaler
    from medsr.volumes import read_volume
    from medsr.volumes.throughplane import plan, reconstruct, resample_axis

    vol = read_volume(a.volume)
    p = plan(vol)
    print(f"{a.volume.name}: {p.describe()}", flush=True)
    arr = np.asarray(vol.array, np.float32)
    nearest = resample_axis(arr, p.axis, np.clip(np.rint(p.positions()), 0, p.n_in - 1), 0)
    bspline = np.asarray(reconstruct(vol, None, dtype=np.float32).array)
    t0 = time.perf_counter()
    model = np.asarray(reconstruct(vol, Upscaler.load(a.model), dtype=np.float32).array)
    print(f"{a.model}: {time.perf_counter() - t0:.1f} s", flush=True)

    lo, hi = (float(arr.min()), float(np.percentile(arr, 99.5))) if not a.window else map(float, a.window.split(","))
    cols = [("input (nearest)", nearest), ("cubic B-spline", bspline), (a.model, model)]
    planes = [ax for ax in range(3) if ax != p.axis]
    sp = p.spacing_out
    fig, axes = plt.subplots(len(planes), len(cols), figsize=(3.6 * len(cols), 3.6 * len(planes)))
    for i, fixed in enumerate(planes):
        other = next(ax for ax in range(3) if ax not in (fixed, p.axis))
        for j, (label, v) in enumerate(cols):
            sl = np.take(v, v.shape[fixed] // 2, axis=fixed)
            img = sl if [ax for ax in range(3) if ax != fixed][0] == p.axis else sl.T  # thick axis vertical
            ax = axes[i, j]
            ax.imshow(np.flipud(img), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                      aspect=sp[p.axis] / sp[other])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=10)
    fig.suptitle(f"{a.volume.name.split('.')[0]}: {p.describe()}", fontsize=9)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
