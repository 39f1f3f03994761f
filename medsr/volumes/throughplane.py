"""Through-plane super-resolution of an anisotropic volume (Jiang et al.; SMORE's prediction scheme).

The low-resolution (LR) axis is the one with the largest voxel spacing. The volume is first interpolated along
that axis with a cubic B-spline onto the isotropic output grid; then every 2D slice of the two orthogonal planes
that contain the LR axis is refined by a 2D RRDB model through the tiled runtime (``Upscaler``, scale 1), and the
two refined stacks are fused by the voxel-wise mean.

The model's call contract (``ModelDescriptor.contract``, recorded with the weights): a 1-channel x1 RRDBNet
whose input is a slice of the interpolated volume, normalised to [0, 1] by the volume's min/max, with the LR
axis along the rows; its output is ``0.5 + (truth - input)``, a residual around 0.5. Two versions:

* ``medsr-through-plane-residual-v1``: the input is the cubic B-spline interpolation (models and engines that
  record no contract are taken as v1);
* ``medsr-through-plane-residual-v2`` (the shipped ``medsr-mr-tp``): the B-spline interpolation projected onto
  the acquired slices (:mod:`medsr.volumes.consistency`: re-acquired with the nominal slice profile, Gaussian
  FWHM = slice gap, it gives the acquired slices exactly). B-spline interpolation of blurred thick slices keeps
  their blur; the projection removes the part of it the acquisition can see, so the model starts closer. The
  fused result is projected again (``reconstruct(consistency=...)``): whatever the model adds, re-acquiring the
  output gives the acquired slices.

Models trained by :mod:`medsr.volumes.training` follow the contract their config names. Because the output is clamped to [0, 1] by every backend, one slice
can move a voxel by at most half the volume's range, and the result is clipped to the input's [min, max]:
no value outside what the scanner wrote is ever produced.

Output grid: ``n_out = round(n * r)`` slices of spacing ``s / r`` that tile the acquired slab: thin slice ``j``
sits at LR coordinate ``(j + 0.5) / r - 0.5``, so the thin slices of one thick slice are centred on it (the
first and last ``(r - 1) / 2`` thin slices lie inside the outer thick slices' extent, beyond their centres).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medsr.volumes.volume import Volume, VolumeError, VolumeMeta

CONTRACT_V1 = "medsr-through-plane-residual-v1"
CONTRACT_V2 = "medsr-through-plane-residual-v2"
#: the contract of the shipped model and of mr_through_plane.toml
THROUGH_PLANE_CONTRACT = CONTRACT_V2
CONTRACTS = (CONTRACT_V1, CONTRACT_V2)
#: ratios closer to 1 than this count as isotropic: refused unless a factor is given
ISOTROPIC_TOLERANCE = 1.2
#: above this many output voxels the working arrays live in memory-mapped temp files
MEMMAP_VOXELS = 64 * 1024 * 1024


class SliceModel(Protocol):
    """What the method needs of an upscaler: float32 H x W in [0, 1] -> float32 H x W (scale 1)."""

    scale: int

    def __call__(self, array: np.ndarray) -> np.ndarray: ...


def model_contract(model: object) -> str:
    """The through-plane contract ``model`` follows: its own ``contract`` attribute or its backend's descriptor's
    (an ``Upscaler``); none recorded = v1 (everything written before contracts were recorded). VolumeError for a
    contract the volume path does not know."""
    d = getattr(getattr(model, "backend", None), "descriptor", None)
    c = getattr(model, "contract", None) or getattr(d, "contract", None) or CONTRACT_V1
    if c not in CONTRACTS:
        name = getattr(model, "model_id", type(model).__name__)
        raise VolumeError(f"model {name!r} follows the call contract {c!r}, not a through-plane one "
                          f"({', '.join(CONTRACTS)})")
    return str(c)


# ----------------------------------------------------------------------------------- interpolation


def interp_matrix(n: int, positions: np.ndarray, order: int = 3) -> np.ndarray:
    """The (len(positions), n) matrix that interpolates a length-``n`` signal at fractional ``positions``:
    B-spline of ``order`` (0 nearest, 1 linear, 3 cubic B-spline with its prefilter), mirror boundary, as
    ``scipy.ndimage.map_coordinates(..., mode="mirror")`` on each line."""
    from scipy import ndimage

    pos = np.asarray(positions, dtype=np.float64)
    if n == 1:
        return np.ones((pos.size, 1))
    if order == 0:  # nearest: ndimage rounds half away from zero inconsistently across versions; be explicit
        idx = np.clip(np.floor(pos + 0.5).astype(int), 0, n - 1)
        m = np.zeros((pos.size, n))
        m[np.arange(pos.size), idx] = 1.0
        return m
    eye = np.eye(n)
    coords = pos[None, :]
    return np.stack([ndimage.map_coordinates(eye[i], coords, order=order, mode="mirror") for i in range(n)], axis=1)


def resample_axis(array: np.ndarray, axis: int, positions: np.ndarray, order: int = 3,
                  out: np.ndarray | None = None, chunk: int = 16) -> np.ndarray:
    """``array`` interpolated along ``axis`` at ``positions`` (LR voxel coordinates), streamed in chunks of
    the first other axis so that only a chunk is in memory; float32 output (``out`` may be a memmap)."""
    m = interp_matrix(array.shape[axis], positions, order).astype(np.float32)
    shape = list(array.shape)
    shape[axis] = len(positions)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    other = [a for a in range(3) if a != axis][0]
    for i0 in range(0, array.shape[other], chunk):
        sl: list[Any] = [slice(None)] * 3
        sl[other] = slice(i0, min(i0 + chunk, array.shape[other]))
        block = np.asarray(array[tuple(sl)], dtype=np.float32)
        res = np.tensordot(block, m, axes=([axis], [1]))  # the new axis is last
        out[tuple(sl)] = np.moveaxis(res, -1, axis)
    return out


# ----------------------------------------------------------------------------------- geometry


def lr_axis(spacing: tuple[float, float, float]) -> int:
    """The axis with the largest spacing; among (near) equals (within 1 %) the last one, which is the slice
    axis of a DICOM series and, by convention, of a NIfTI file."""
    sp = np.asarray(spacing, dtype=np.float64)
    return int(np.flatnonzero(sp >= 0.99 * sp.max())[-1])


@dataclass(frozen=True)
class Plan:
    """What :func:`reconstruct` will do to a volume: the LR axis, the factor, the output grid."""

    axis: int
    factor: float
    n_in: int
    n_out: int
    in_shape: tuple[int, int, int]
    spacing_in: tuple[float, float, float]
    affine_out: np.ndarray = field(repr=False)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        s = list(self.in_shape)
        s[self.axis] = self.n_out
        return tuple(s)  # type: ignore[return-value]

    @property
    def spacing_out(self) -> tuple[float, float, float]:
        s = list(self.spacing_in)
        s[self.axis] = s[self.axis] / self.factor
        return tuple(s)  # type: ignore[return-value]

    def positions(self) -> np.ndarray:
        """LR coordinates of the output slices (centred grid: see the module docstring)."""
        j = np.arange(self.n_out, dtype=np.float64)
        return (j + 0.5) / self.factor - 0.5

    def describe(self) -> str:
        names = "ijk"
        sp_in = "x".join(f"{v:.3g}" for v in self.spacing_in)
        sp_out = "x".join(f"{v:.3g}" for v in self.spacing_out)
        return (f"LR axis {names[self.axis]} (spacing {sp_in} mm), factor {self.factor:g}: "
                f"{'x'.join(map(str, self.in_shape))} -> {'x'.join(map(str, self.out_shape))} at {sp_out} mm")


def plan(volume: Volume, *, axis: int | None = None, factor: float | None = None,
         target_spacing: float | None = None) -> Plan:
    """The reconstruction plan for ``volume``; VolumeError for an isotropic volume without a factor, for a
    factor below 1, or for a volume too thin along the LR axis."""
    spacing = volume.spacing
    src = f"{volume.meta.source}: " if volume.meta.source else ""
    a = lr_axis(spacing) if axis is None else int(axis)
    if a not in (0, 1, 2):
        raise VolumeError(f"{src}axis must be 0, 1 or 2, got {axis}")
    inplane = [spacing[i] for i in range(3) if i != a]
    # the distance between slice planes, not the step between slices: they differ with a gantry tilt (sheared)
    gap = volume.plane_distance(a)
    if factor is not None and target_spacing is not None:
        raise VolumeError("give a factor or a target spacing, not both")
    if target_spacing is not None:
        if target_spacing <= 0:
            raise VolumeError(f"target spacing must be positive, got {target_spacing}")
        r = gap / float(target_spacing)
    elif factor is not None:
        r = float(factor)
    else:
        r = gap / float(np.mean(inplane))
        if r < ISOTROPIC_TOLERANCE:
            sp = "x".join(f"{v:.3g}" for v in spacing)
            raise VolumeError(
                f"{src}volume is already (near) isotropic ({sp} mm; ratio {r:.2f} < {ISOTROPIC_TOLERANCE}): "
                "nothing to restore; give --factor or --spacing to upscale anyway")
    if not math.isfinite(r) or r < 1.0:
        raise VolumeError(f"{src}factor must be at least 1, got {r:g}")
    if r > 8:
        raise VolumeError(f"{src}factor {r:g} is beyond what the model was trained for (2-4; at most 8 allowed)")
    n_in = volume.shape[a]
    if n_in < 2:
        raise VolumeError(f"{src}only {n_in} slice along the LR axis: through-plane interpolation needs at least 2")
    n_out = int(round(n_in * r))
    aff = volume.affine.copy()
    col = aff[:3, a].copy()
    aff[:3, a] = col / r
    aff[:3, 3] = aff[:3, 3] + col * (0.5 / r - 0.5)
    return Plan(a, r, n_in, n_out, volume.shape, spacing, aff)


# ----------------------------------------------------------------------------------- the slice profile

#: the slice profile's FWHM, in slice gaps, is kept within these bounds whatever a header says
PROFILE_RANGE = (0.5, 2.0)


def _thickness(ds: Any) -> float | None:
    t = getattr(ds, "SliceThickness", None)
    if t is None:  # enhanced multi-frame: the shared functional groups' pixel measures
        try:
            t = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        v = float(t)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def slice_profile(volume: Volume, axis: int) -> tuple[float, str]:
    """The slice profile's FWHM in units of the distance between slice planes, and where it came from: a DICOM
    series' SliceThickness over that distance when the LR axis is its slice axis (k), kept within
    ``PROFILE_RANGE``; otherwise 1.0 (thickness = gap: NIfTI/MGZ files do not record a thickness)."""
    if volume.meta.format == "dicom" and axis == 2 and volume.meta.datasets:
        t = _thickness(volume.meta.datasets[0])
        gap = volume.plane_distance(axis)
        if t is not None and gap > 0:
            f = min(max(t / gap, PROFILE_RANGE[0]), PROFILE_RANGE[1])
            return f, f"slice profile FWHM {f:.3g} slice gaps (SliceThickness {t:g} mm, gap {gap:.4g} mm)"
    return 1.0, "slice profile FWHM 1 slice gap (assumed: thickness = gap)"


# ----------------------------------------------------------------------------------- the method


def _scratch(shape: tuple[int, ...], workdir: Path | None, name: str) -> np.ndarray:
    if int(np.prod(shape)) < MEMMAP_VOXELS:
        return np.empty(shape, dtype=np.float32)
    d = Path(tempfile.mkdtemp(prefix="medsr-vol-", dir=workdir))
    return np.lib.format.open_memmap(d / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)


def _range(array: np.ndarray, src: str) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for i in range(array.shape[0]):
        s = np.asarray(array[i])
        if s.dtype.kind == "f" and not np.isfinite(s).all():
            raise VolumeError(f"{src}volume holds NaN or infinite values (slice {i} of axis 0)")
        lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    return lo, hi


def reconstruct(
    volume: Volume,
    model: SliceModel | None,
    *,
    axis: int | None = None,
    factor: float | None = None,
    target_spacing: float | None = None,
    planes: int = 2,
    positions: np.ndarray | None = None,
    dtype: np.dtype | str | None = None,
    workdir: str | Path | None = None,
    progress: Callable[[int, int], object] | None = None,
    consistency: bool | None = None,
    profile: float | None = None,
) -> Volume:
    """Restore ``volume`` to (near) isotropic voxels along its LR axis.

    ``model`` None gives the cubic B-spline interpolation alone (the baseline). ``planes`` 2 = both planes
    that contain the LR axis, fused by the mean (the method); 1 = the first plane only (for ablations).
    ``positions`` overrides the output grid (LR coordinates; evaluation uses ``arange(n_hr) / r``; uniformly
    spaced). ``dtype`` of the result: default the input's (integers rounded and clipped to the input's range).
    ``progress(done, total)`` counts slices. ``consistency``: project the fused result onto the acquired
    slices (:mod:`medsr.volumes.consistency`); None = as the model's contract says (v2: yes; v1 and the
    B-spline baseline: no). Measured in docs/volumes.md. ``profile``: the slice profile's FWHM in slice gaps
    that the projections assume (None: :func:`slice_profile`).
    """
    src = f"{volume.meta.source}: " if volume.meta.source else ""
    p = plan(volume, axis=axis, factor=factor, target_spacing=target_spacing)
    if positions is not None:
        pos = np.asarray(positions, dtype=np.float64)
        p = Plan(p.axis, p.factor, p.n_in, len(pos), p.in_shape, p.spacing_in, p.affine_out)
    else:
        pos = p.positions()
    if model is not None and getattr(model, "scale", 1) != 1:
        raise VolumeError(f"through-plane models are x1 (interpolation first, then refinement); this one is "
                          f"x{model.scale}")
    if planes not in (1, 2):
        raise ValueError(f"planes must be 1 or 2, got {planes}")
    contract = model_contract(model) if model is not None else None
    lo, hi = _range(volume.array, src)
    span = hi - lo if hi > lo else 1.0
    wd = Path(workdir) if workdir is not None else None
    if consistency is None:
        consistency = contract == CONTRACT_V2
    projector = None
    notes = [*volume.meta.notes, p.describe()]
    if contract == CONTRACT_V2 or consistency:
        from medsr.volumes.consistency import Projector

        if profile is None:
            profile, why = slice_profile(volume, p.axis)
        else:
            why = f"slice profile FWHM {profile:g} slice gaps (given)"
        notes.append(why)
        try:
            projector = Projector(pos, p.n_in, fwhm=float(profile))
        except ValueError as e:
            raise VolumeError(f"{src}{e}") from e

    interp = _scratch(p.out_shape, wd, "interp")
    resample_axis(volume.array, p.axis, pos, 3, out=interp)
    if contract == CONTRACT_V2 and projector is not None:  # the model's input: B-spline made consistent
        projector.along(interp, volume.array, p.axis)
    # normalise in place, streamed; overshoot beyond the acquired range is clipped (as in training)
    for i in range(interp.shape[0]):
        interp[i] = np.clip((interp[i] - lo) / span, 0.0, 1.0)

    if model is None:
        fused = interp
    else:
        fused = _scratch(p.out_shape, wd, "fused")
        fixed_axes = [a for a in range(3) if a != p.axis][::-1][:planes]  # fixing one in-plane axis leaves a plane
        total = sum(p.out_shape[f] for f in fixed_axes)
        done = 0
        for k, fixed in enumerate(fixed_axes):
            lr_rows = p.axis == min(a for a in range(3) if a != fixed)  # LR axis first in the 2D slice?
            for idx in range(p.out_shape[fixed]):
                sl: list[Any] = [slice(None)] * 3
                sl[fixed] = idx
                plane = np.asarray(interp[tuple(sl)], dtype=np.float32)  # 2D, axes in volume order
                x = plane if lr_rows else plane.T  # LR axis along the rows (the contract)
                y = np.asarray(model(np.ascontiguousarray(x)), dtype=np.float32)
                rec = x + (y - 0.5)
                rec = rec if lr_rows else rec.T
                if k == 0:
                    fused[tuple(sl)] = rec
                else:
                    fused[tuple(sl)] = (np.asarray(fused[tuple(sl)]) + rec) * 0.5
                done += 1
                if progress is not None:
                    progress(done, total)

    if consistency and projector is not None:
        projector.along(fused, volume.array, p.axis, lo=0.0, hi=1.0, y_offset=lo, y_scale=span)

    out_dtype = np.dtype(dtype) if dtype is not None else np.asarray(volume.array[:1, :1, :1]).dtype
    result = np.empty(p.out_shape, dtype=out_dtype) if int(np.prod(p.out_shape)) < MEMMAP_VOXELS else \
        _scratch_typed(p.out_shape, out_dtype, wd)
    for i in range(p.out_shape[0]):
        v = np.clip(np.asarray(fused[i]), 0.0, 1.0) * span + lo
        if out_dtype.kind in "iu":
            v = np.clip(np.rint(v), lo, hi)
        result[i] = v.astype(out_dtype)
    meta = VolumeMeta(source=volume.meta.source, format=volume.meta.format, units=volume.meta.units,
                      series_uid=volume.meta.series_uid, study_uid=volume.meta.study_uid,
                      modality=volume.meta.modality, datasets=volume.meta.datasets, notes=notes,
                      header=volume.meta.header)
    return Volume(result, p.affine_out, meta)


def _scratch_typed(shape: tuple[int, ...], dtype: np.dtype, workdir: Path | None) -> np.ndarray:
    d = Path(tempfile.mkdtemp(prefix="medsr-vol-", dir=workdir))
    return np.lib.format.open_memmap(d / "result.npy", mode="w+", dtype=dtype, shape=shape)
