"""Volume evaluation: simulate thick slices from an isotropic volume, reconstruct, score against the original.

Protocol (``medsr-eval --volumes``): along ``axis`` (default k, the last voxel axis), a Gaussian slice profile
of FWHM = r voxels, every r-th slice kept from slice 0 (:func:`medsr.volumes.training.simulate_thick`); each
method reconstructs the original grid (LR coordinate of thin slice j = j / r). Scores against the original:

* PSNR inside a foreground mask (truth above min + 10 % of (p99.5 - min)), peak = truth max - min;
* SSIM 3D (scikit-image, data range as above) over the whole volume;
* SSIM slice-wise: the mean 2D SSIM over the slices that contain the LR axis (both planes), the views in which
  through-plane blur shows.

Rows: nearest, linear and cubic B-spline interpolation through-plane (order 0, 1, 3; mirror boundary); the
B-spline projected onto the acquired slices (``bspline+dc``, :mod:`medsr.volumes.consistency`: no model, the
linear part of what a contract-v2 model starts from); and each model (its contract's input, the 2D model in two
planes, mean fusion).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsr.volumes.throughplane import reconstruct, resample_axis
from medsr.volumes.training import simulate_thick
from medsr.volumes.volume import Volume

BASELINES = {"nearest": 0, "linear": 1, "bspline": 3}
#: the B-spline projected onto the acquired slices (no model)
CONSISTENT_BASELINE = "bspline+dc"
ROW_ORDER = [*BASELINES, CONSISTENT_BASELINE]


@dataclass
class Score:
    volume: str
    factor: int
    method: str
    psnr: float
    ssim3d: float
    ssim2d: float
    seconds: float


def foreground(truth: np.ndarray) -> np.ndarray:
    lo = float(truth.min())
    hi = float(np.percentile(truth, 99.5))
    return truth > lo + 0.1 * (hi - lo)


def score(pred: np.ndarray, truth: np.ndarray, axis: int, mask: np.ndarray | None = None) -> tuple[float, float, float]:
    """(masked PSNR, SSIM 3D, slice-wise SSIM) of ``pred`` against ``truth``."""
    from skimage.metrics import structural_similarity

    truth = truth.astype(np.float64)
    pred = pred.astype(np.float64)
    rng = float(truth.max() - truth.min()) or 1.0
    m = foreground(truth) if mask is None else mask
    mse = float(np.mean((pred[m] - truth[m]) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(rng * rng / mse)
    s3 = float(structural_similarity(truth, pred, data_range=rng))
    vals = []
    for fixed in (a for a in range(3) if a != axis):
        for i in range(truth.shape[fixed]):
            t2 = np.take(truth, i, axis=fixed)
            if np.ptp(t2) == 0:
                continue
            vals.append(structural_similarity(t2, np.take(pred, i, axis=fixed), data_range=rng))
    return psnr, s3, float(np.mean(vals)) if vals else float("nan")


def evaluate(
    truth: Volume,
    models: dict[str, object],
    *,
    name: str,
    factors: Sequence[int] = (2, 4),
    axis: int = 2,
    log: Callable[[str], object] | None = None,
    keep: dict[tuple[int, str], np.ndarray] | None = None,
) -> list[Score]:
    """Score the baselines and each model (a ``SliceModel``, e.g. an ``Upscaler``) on ``truth``.
    ``keep`` (optional) collects the reconstructions by (factor, method), for figures."""
    arr = np.asarray(truth.array, dtype=np.float32)
    mask = foreground(arr)
    out: list[Score] = []
    for r in factors:
        thick = simulate_thick(arr, axis, r)
        aff = truth.affine.copy()
        aff[:3, axis] *= r
        lr = Volume(thick, aff)
        pos = np.arange(arr.shape[axis]) / r
        methods: list[tuple[str, object]] = [(m, o) for m, o in BASELINES.items()]
        methods += [(CONSISTENT_BASELINE, None), *models.items()]
        for mname, how in methods:
            t0 = time.perf_counter()
            if isinstance(how, int):
                y = resample_axis(thick, axis, pos, how)
            elif how is None:
                y = np.asarray(reconstruct(lr, None, axis=axis, factor=r, positions=pos, dtype=np.float32,
                                           consistency=True).array)
            else:
                y = np.asarray(reconstruct(lr, how, axis=axis, factor=r, positions=pos,  # type: ignore[arg-type]
                                           dtype=np.float32).array)
            dt = time.perf_counter() - t0
            p, s3, s2 = score(y, arr, axis, mask)
            out.append(Score(name, r, mname, p, s3, s2, dt))
            if keep is not None:
                keep[(r, mname)] = y
            if log is not None:
                log(f"{name} r={r} {mname:>10}: PSNR {p:6.2f} dB  SSIM3D {s3:.4f}  SSIM2D {s2:.4f}  ({dt:.1f} s)")
        if keep is not None:
            keep[(r, "input")] = resample_axis(thick, axis, pos, 0)
    return out


def table(scores: Sequence[Score]) -> str:
    """A Markdown table, one row per (volume, factor, method), plus the mean over volumes per (factor, method)."""
    lines = ["| volume | r | method | PSNR (masked) | SSIM 3D | SSIM 2D | s |", "|---|---:|---|---:|---:|---:|---:|"]
    for s in scores:
        lines.append(f"| {s.volume} | {s.factor} | {s.method} | {s.psnr:.2f} | {s.ssim3d:.4f} | {s.ssim2d:.4f} | "
                     f"{s.seconds:.1f} |")
    keys = sorted({(s.factor, s.method) for s in scores},
                  key=lambda k: (k[0], ROW_ORDER.index(k[1]) if k[1] in ROW_ORDER else len(ROW_ORDER)))
    for r, m in keys:
        sel = [s for s in scores if s.factor == r and s.method == m]
        lines.append(f"| **mean** ({len(sel)}) | {r} | {m} | {np.mean([s.psnr for s in sel]):.2f} | "
                     f"{np.mean([s.ssim3d for s in sel]):.4f} | {np.mean([s.ssim2d for s in sel]):.4f} | "
                     f"{np.mean([s.seconds for s in sel]):.1f} |")
    return "\n".join(lines)


def figure(recons: dict[tuple[int, str], np.ndarray], truth: np.ndarray, axis: int, factor: int, model: str,
           path: str | Path, title: str = "") -> Path:
    """Sagittal and coronal views (the two planes that contain the LR axis): input (nearest), B-spline,
    the model, truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("input (nearest)", recons[(factor, "input")]), ("B-spline", recons[(factor, "bspline")]),
            (model, recons[(factor, model)]), ("truth", truth)]
    planes = [a for a in range(3) if a != axis]
    lo, hi = float(truth.min()), float(np.percentile(truth, 99.5))
    fig, axes = plt.subplots(len(planes), len(cols), figsize=(3.2 * len(cols), 3.2 * len(planes)))
    for i, fixed in enumerate(planes):
        idx = truth.shape[fixed] // 2
        for j, (label, vol) in enumerate(cols):
            sl = np.take(vol, idx, axis=fixed)
            # show with the LR axis vertical
            rest = [a for a in range(3) if a != fixed]
            img = sl if rest[0] == axis else sl.T
            ax = axes[i, j]
            ax.imshow(np.flipud(img), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect="equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=10)
    fig.suptitle(title or f"r = {factor}", fontsize=11)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mgz")


def list_volumes(data: Path) -> list[Path]:
    """NIfTI/MGZ files in ``data`` (a file or a folder, not recursive), sorted."""
    if data.is_file():
        return [data]
    return sorted(p for p in data.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))


def run(data: Path, models: dict[str, object], out_dir: Path, *, factors: Sequence[int] = (2, 4), axis: int = 2,
        figures: bool = True, log: Callable[[str], object] = print) -> Path:
    """Evaluate every volume under ``data``; write ``summary.md``, ``results.csv`` and one figure per volume
    and factor (``fig_<volume>_r<r>.png``) to ``out_dir``. Returns the summary's path."""
    import csv

    from medsr.volumes.io import read_volume

    paths = list_volumes(data)
    if not paths:
        raise FileNotFoundError(f"{data}: no NIfTI/MGZ volumes (.nii, .nii.gz, .mgz)")
    out_dir.mkdir(parents=True, exist_ok=True)
    scores: list[Score] = []
    for p in paths:
        vol = read_volume(p)
        name = p.name.split(".")[0]
        keep: dict[tuple[int, str], np.ndarray] | None = {} if figures else None
        scores += evaluate(vol, models, name=name, factors=factors, axis=axis, log=log, keep=keep)
        if keep is not None and models:
            m = next(iter(models))
            for r in factors:
                figure(keep, np.asarray(vol.array, np.float32), axis, r, m, out_dir / f"fig_{name}_r{r}.png",
                       title=f"{name}: thick slices r = {r} along axis {'ijk'[axis]} (rows: planes containing it)")
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["volume", "factor", "method", "psnr_masked", "ssim3d", "ssim2d", "seconds"])
        for s in scores:
            w.writerow([s.volume, s.factor, s.method, f"{s.psnr:.4f}", f"{s.ssim3d:.5f}", f"{s.ssim2d:.5f}",
                        f"{s.seconds:.2f}"])
    summary = out_dir / "summary.md"
    summary.write_text(__doc__.split("\n\n", 1)[1] + "\n\n" + table(scores) + "\n")
    log(table(scores))
    return summary
