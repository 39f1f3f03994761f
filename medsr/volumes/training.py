"""Self-supervised training pairs for the through-plane model (SMORE's idea, Jiang et al.'s 2D model).

In-plane slices of (near) isotropic volumes are high resolution in both directions. Degrading one direction
with a slice profile (Gaussian, FWHM = slice thickness), keeping every r-th row and interpolating back with the
same cubic B-spline the method uses gives (input, truth) pairs for free. Pairs follow the model contract of
:mod:`medsr.volumes.throughplane`: the LR direction is along the rows, the input is the interpolated slice in
[0, 1] (volume min/max), the target is ``0.5 + truth - input``.

The same degradation along a volume axis (:func:`simulate_thick`) is what ``medsr-eval`` scores volumes with.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medsr.volumes.consistency import FWHM_TO_SIGMA, TRUNCATE, Projector
from medsr.volumes.throughplane import interp_matrix
from medsr.volumes.volume import Volume


def blur_axis(array: np.ndarray, axis: int, fwhm: float) -> np.ndarray:
    """Gaussian slice profile of ``fwhm`` voxels along ``axis`` (mirror boundary), float32."""
    from scipy import ndimage

    return ndimage.gaussian_filter1d(np.asarray(array, dtype=np.float32), fwhm * FWHM_TO_SIGMA, axis=axis,
                                     mode="mirror", truncate=TRUNCATE)


def degrade_rows(image: np.ndarray, r: int, fwhm: float, phase: int = 0, consistent: bool = False) -> np.ndarray:
    """A 2D slice thickened along its rows: blurred with the profile, every ``r``-th row kept from ``phase``,
    and B-spline-interpolated back onto the original rows (the model's input for that slice). ``consistent``:
    then projected onto the rows that re-acquire the thick rows under the nominal profile FWHM = ``r`` (contract
    v2, :mod:`medsr.volumes.consistency`; the nominal profile, not ``fwhm``: the method does not know the real
    one)."""
    h = image.shape[0]
    thick = blur_axis(image, 0, fwhm)[phase::r]
    pos = (np.arange(h) - phase) / r
    m = interp_matrix(thick.shape[0], pos, 3).astype(np.float32)
    x = m @ thick
    return Projector(pos, thick.shape[0]).rows(x, thick) if consistent else x


def simulate_thick(array: np.ndarray, axis: int, r: int, fwhm: float | None = None) -> np.ndarray:
    """The evaluation's thick-slice volume: Gaussian profile FWHM = ``r`` voxels (or ``fwhm``) along ``axis``,
    every ``r``-th slice kept starting at 0."""
    thick = blur_axis(array, axis, float(r) if fwhm is None else fwhm)
    sl = [slice(None)] * 3
    sl[axis] = slice(0, None, r)
    return np.ascontiguousarray(thick[tuple(sl)])


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asarray(img.get_fdata(dtype=np.float32))
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo if hi > lo else 1.0)


def _stem(path: Path) -> str:
    return re.sub(r"(\.nii(\.gz)?|\.mgz)$", "", path.name)


def _write(path: Path, img: np.ndarray) -> None:
    import cv2

    u16 = np.clip(np.rint(img * 65535.0), 0, 65535).astype(np.uint16)
    if not cv2.imwrite(str(path), u16, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"{path}: could not write")


def make_pairs(
    volumes: Sequence[str | Path],
    out_dir: str | Path,
    *,
    holdout: Sequence[str] = (),
    factors: Sequence[int] = (2, 3, 4),
    per_axis: int = 24,
    draws: int = 2,
    fwhm_jitter: tuple[float, float] = (0.8, 1.25),
    gain: tuple[float, float] = (0.5, 1.0),
    min_foreground: float = 0.15,
    consistent: bool = False,
    seed: int = 0,
) -> dict[str, int]:
    """Write ``out_dir/{train,val}/{hr,lr}/*.png`` (16-bit) from (near) isotropic ``volumes``; those whose stem
    is in ``holdout`` go to val with the nominal profile (FWHM = r, phase 0, gain 1) and factors cycled.
    Training pairs draw r from ``factors``, FWHM = r x U(``fwhm_jitter``), a random phase and an intensity
    gain. Slices: ``per_axis`` evenly spaced slices per axis whose foreground (> 5 % of the max) covers at least
    ``min_foreground`` of the slice; each slice is used with either direction as the LR one. ``consistent``:
    inputs for contract v2 (:func:`degrade_rows`)."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for path in map(Path, volumes):
        name = _stem(path)
        split = "val" if name in set(holdout) else "train"
        val = split == "val"
        counts[split] += slice_pairs(
            _load(path), out / split, name, rng, slice_axes=(0, 1, 2), factors=factors,
            per_axis=max(2, per_axis // 4) if val else per_axis, draws=1 if val else draws,
            fwhm_jitter=None if val else fwhm_jitter, gain=None if val else gain, min_foreground=min_foreground,
            consistent=consistent)
    return counts


def slice_pairs(
    vol: np.ndarray,
    out: Path,
    name: str,
    rng: np.random.Generator,
    *,
    slice_axes: Sequence[int],
    factors: Sequence[int],
    per_axis: int,
    draws: int,
    fwhm_jitter: tuple[float, float] | None,
    gain: tuple[float, float] | None,
    min_foreground: float = 0.15,
    consistent: bool = False,
) -> int:
    """Pairs from the slices of a normalised volume (``vol`` in [0, 1]) perpendicular to ``slice_axes`` into
    ``out/{hr,lr}``. ``fwhm_jitter``/``gain`` None = the nominal profile (FWHM = r, phase 0, gain 1, factors
    cycled). Returns the number written."""
    for sub in ("hr", "lr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    k = 0
    for axis in slice_axes:
        fg = np.moveaxis(vol > 0.05, axis, 0).reshape(vol.shape[axis], -1).mean(axis=1)
        ok = np.flatnonzero(fg >= min_foreground)
        if ok.size == 0 and fg.max() > 0:
            # sparse volumes (a CT angiography with everything but the vessels at 0: 4 % of voxels above 5 %
            # of the range) have no slice with min_foreground: take the slices with at least half the best one's
            ok = np.flatnonzero(fg >= 0.5 * fg.max())
        if ok.size == 0:
            continue
        pick = np.unique(ok[np.linspace(0, ok.size - 1, min(per_axis, ok.size)).round().astype(int)])
        for idx in pick:
            sl = np.take(vol, int(idx), axis=axis)
            for orient in (0, 1):
                im = np.ascontiguousarray(sl if orient == 0 else sl.T, dtype=np.float32)
                for _ in range(draws):
                    if fwhm_jitter is None:
                        r = int(factors[k % len(factors)])
                        fwhm, phase = float(r), 0
                    else:
                        r = int(rng.choice(factors))
                        fwhm, phase = r * float(rng.uniform(*fwhm_jitter)), int(rng.integers(r))
                    g = 1.0 if gain is None else float(rng.uniform(*gain))
                    if im.shape[0] < 2 * r:
                        continue
                    lq = np.clip(degrade_rows(im, r, fwhm, phase, consistent), 0.0, 1.0) * g
                    tgt = np.clip(0.5 + im * g - lq, 0.0, 1.0)
                    stem = f"{name}_a{axis}_s{int(idx):03d}_o{orient}_r{r}_{k:05d}"
                    _write(out / "lr" / f"{stem}.png", lq)
                    _write(out / "hr" / f"{stem}.png", tgt)
                    k += 1
    return k


def adaptation_pairs(volume: Volume, out_dir: str | Path, *, axis: int | None = None, factor: float | None = None,
                     per_axis: int = 48, draws: int = 2, consistent: bool = False, seed: int = 0) -> dict[str, int]:
    """SMORE-style per-volume pairs: the volume's own in-plane slices (perpendicular to its LR axis, high
    resolution in both directions) degraded along either in-plane direction by the volume's own factor
    (rounded to an integer in 2..4) with jittered profiles; a tenth of the slices (nominal profile) for
    validation. ``consistent``: inputs of contract v2. Writes ``out_dir/{train,val}/{hr,lr}``."""
    from medsr.volumes.throughplane import plan

    p = plan(volume, axis=axis, factor=factor)
    r = int(min(4, max(2, round(p.factor))))
    arr = np.asarray(volume.array, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    vol = (arr - lo) / (hi - lo if hi > lo else 1.0)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    n_tr = slice_pairs(vol, out / "train", "adapt", rng, slice_axes=(p.axis,), factors=(r,), per_axis=per_axis,
                       draws=draws, fwhm_jitter=(0.85, 1.15), gain=(0.7, 1.0), consistent=consistent)
    n_va = slice_pairs(vol, out / "val", "adapt_val", rng, slice_axes=(p.axis,), factors=(r,),
                       per_axis=max(2, per_axis // 8), draws=1, fwhm_jitter=None, gain=None, consistent=consistent)
    return {"train": n_tr, "val": n_va, "factor": r, "axis": p.axis}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medsr.volumes.training VOL... --out DIR [--holdout STEM]``: write the pairs."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("volumes", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--holdout", action="append", default=[])
    ap.add_argument("--per-axis", type=int, default=24)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    counts = make_pairs(a.volumes, a.out, holdout=a.holdout, per_axis=a.per_axis, draws=a.draws, seed=a.seed)
    print(f"pairs: {counts['train']} train, {counts['val']} val -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ------------------------------------------------------------------------------------ medsr-train set-ups

VOLUME_CONFIG = "mr_through_plane"


def configure_volume_training(cfg: dict, volumes_dir: str | Path, holdout: Sequence[str],
                              log: Callable[[str], object]) -> None:
    """``medsr-train --volumes DIR``: write self-supervised pairs from DIR's NIfTI/MGZ volumes into
    ``<out>/pairs`` and point the (paired-mode) config at them; ``holdout`` stems become the validation set."""
    from medsr.volumes.evaluate import list_volumes

    paths = list_volumes(Path(volumes_dir))
    if not paths:
        raise ValueError(f"{volumes_dir}: no NIfTI/MGZ volumes (.nii, .nii.gz, .mgz)")
    stems = {_stem(p) for p in paths}
    missing = sorted(set(holdout) - stems)
    if missing:
        raise ValueError(f"--holdout {', '.join(missing)}: no such volume in {volumes_dir} ({', '.join(sorted(stems))})")
    pairs = Path(cfg["train"]["out_dir"]) / "pairs"
    vcfg = cfg.get("volumes", {})
    counts = make_pairs(paths, pairs, holdout=holdout, per_axis=int(vcfg.get("per_axis", 24)),
                        draws=int(vcfg.get("draws", 2)), factors=tuple(int(f) for f in vcfg.get("factors", (2, 3, 4))),
                        consistent=bool(vcfg.get("consistent", False)))
    log(f"data: {counts['train']} training pairs from {len(paths) - len(holdout)} volumes, {counts['val']} "
        f"validation pairs from {len(holdout)} held-out volume(s) -> {pairs}")
    _paired(cfg, pairs, bool(holdout))


def configure_adaptation(cfg: dict, scan: str | Path, minutes: float, log: Callable[[str], object]) -> None:
    """``medsr-train --adapt SCAN``: fine-tune the through-plane model on SCAN's own in-plane slices (SMORE)
    for ``minutes``, constant lr 1e-4, from ``model.pretrained`` (default medsr-mr-tp); the weights kept are
    those with the best PSNR on the scan's own held-out in-plane slices (the starting model included)."""
    from medsr.volumes.io import read_volume
    from medsr.volumes.throughplane import CONTRACT_V2, model_contract
    from medsr.volumes.upscaler import DEFAULT_VOLUME_MODEL
    from medsr.weights import load_model

    if not cfg["model"].get("pretrained"):
        cfg["model"]["pretrained"] = DEFAULT_VOLUME_MODEL
    # the adapted model keeps the starting model's contract: its pairs are made for it
    contract = model_contract(load_model(cfg["model"]["pretrained"]).model)
    cfg["model"]["contract"] = contract
    vol = read_volume(scan)
    pairs = Path(cfg["train"]["out_dir"]) / "pairs"
    counts = adaptation_pairs(vol, pairs, consistent=contract == CONTRACT_V2)
    if counts["train"] == 0:
        raise ValueError(f"{scan}: no in-plane slice holds signal to adapt on (the volume is empty or constant)")
    log(f"data: {counts['train']} training + {counts['val']} validation pairs from the in-plane slices of {scan} "
        f"(LR axis {'ijk'[counts['axis']]}, factor {counts['factor']})")
    _paired(cfg, pairs, True)
    t = cfg["train"]
    t.update(time_limit_min=float(minutes), keep_best=True, lr_g=1e-4, lr_schedule="constant", total_iter=max(int(t["total_iter"]), 10**6),
             val_every=100, save_every=10**6, log_every=25)


def _paired(cfg: dict, pairs: Path, val: bool) -> None:
    d = cfg["data"]
    d.update(mode="paired", train_dir=str(pairs / "train" / "hr"), lq_dir=str(pairs / "train" / "lr"))
    if val:
        d["val_dir"] = str(pairs / "val")
