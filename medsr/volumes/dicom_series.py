"""DICOM CT/MR series (a folder or a list of files, or one enhanced multi-frame file) -> :class:`Volume`.

Conventions (those of nibabel's DICOM reader, ``nibabel.nicom``): ``array[i, j, k]`` is column ``i``, row ``j``
of slice ``k``, slices sorted along the slice normal (ImageOrientationPatient row x column, dotted with
ImagePositionPatient; InstanceNumber is never used); the affine maps (i, j, k) to RAS+ mm: the LPS patient
coordinates of DICOM with the first two axes negated. dcm2niix writes the same voxels with the row axis
flipped (and sometimes the slices reversed); the world coordinates of every voxel agree (tests/test_volumes_io.py).

Geometry is checked, never assumed (tolerance: 0.01 mm or 1 % of the slice spacing, whichever is larger):
one orientation, one pixel grid, every position on one line, uniform spacing along the normal. A series whose
slice positions move in-plane from slice to slice (CT gantry tilt) is read with a *sheared* affine: the slice
axis is the true step between consecutive ImagePositionPatient, so every voxel sits where the scanner put it
(nothing is resampled). Refused with a :class:`VolumeError` naming the series and the problem: several series
(unless ``series_uid`` picks one), mixed orientations or pixel grids, missing slices, non-uniform spacing,
positions off one line, 4D (repeated positions, several temporal positions or stacks), Siemens mosaics,
colour, fewer than 2 slices.

Memory: headers are read first (``stop_before_pixels``) and checked; then the pixels are decoded one slice
(one frame) at a time into one preallocated array.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsr.volumes.volume import Volume, VolumeError, VolumeMeta

log = logging.getLogger("medsr.volumes")

CT_MR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
}
#: positions closer than this (mm) are the same; spacing tolerance is max(POS_TOL_MM, REL_TOL * spacing)
POS_TOL_MM = 0.01
REL_TOL = 0.01
#: direction cosines that differ by more than this are another orientation
IOP_TOL = 1e-4
#: LPS (DICOM) <-> RAS (NIfTI): negate x and y
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Plane:
    """One 2D image of the series: a single-frame file or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns) mm
    rows: int
    cols: int
    slope: float
    intercept: float
    temporal: str = ""
    stack: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.name} frame {self.frame + 1}" if self.frame is not None else self.path.name


# ------------------------------------------------------------------------------------------ files


def list_files(src: str | Path | list[str | Path] | tuple[str | Path, ...]) -> list[Path]:
    """The candidate files of a series: a folder's files (recursively, hidden files and DICOMDIR left out,
    sorted by path) or the given list."""
    if isinstance(src, (list, tuple)):
        return [Path(p) for p in src]
    folder = Path(src)
    if not folder.is_dir():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.name.upper() != "DICOMDIR" and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_header(path: Path, specific_tags: list[str] | None = None) -> Any | None:
    """The dataset of ``path`` without pixel data, or None if it is not DICOM (or deflated: its data set would be
    inflated whole, so it is left to the 2D reader's bounded inflate; see medsr.io.probe.dicom_deflated)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medsr.io.dicom import _quiet
    from medsr.io.probe import dicom_deflated

    if dicom_deflated(path):
        return None

    with _quiet(path):
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=specific_tags)
        except InvalidDicomError:
            pass  # no preamble: try a raw data set, accepted only if it looks like an image
        except Exception:
            return None
        try:
            with open(path, "rb") as f:
                head = f.read(2)
            if head not in (b"\x02\x00", b"\x08\x00"):  # a raw data set starts with group 0002 or 0008 (LE)
                return None
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=specific_tags)
            return ds if "SOPClassUID" in ds and "SeriesInstanceUID" in ds else None
        except Exception:
            return None


def is_ct_mr_image(ds: Any) -> bool:
    sop = str(ds.get("SOPClassUID", "") or "")
    return sop in CT_MR_SOP_CLASSES or (
        not sop and str(ds.get("Modality", "")).upper() in ("CT", "MR") and "Rows" in ds)


def _n_frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _describe(uid: str, items: list[tuple[Path, Any]]) -> str:
    ds = items[0][1]
    n = sum(_n_frames(d) for _, d in items)
    desc = str(ds.get("SeriesDescription", "") or "").strip()
    return f"{uid} ({ds.get('Modality', '?')}, {n} image(s){', ' + repr(desc) if desc else ''})"


def group_series(src: Any, series_uid: str | None = None) -> tuple[str, str, list[tuple[Path, Any]]]:
    """(where, series UID, [(path, header)]) of the one CT/MR series in ``src`` (or the one ``series_uid``
    names). VolumeError when there is none, several, or the asked one is missing."""
    files = list_files(src)
    if not isinstance(src, (list, tuple)):
        where = str(src)
    else:
        where = str(files[0]) if len(files) == 1 else f"{files[0].parent if files else '.'} ({len(files)} files)"
    if not files:
        raise VolumeError(f"{where}: no files")
    series: dict[str, list[tuple[Path, Any]]] = {}
    others: dict[str, int] = {}
    skipped = 0
    for f in files:
        if not f.is_file():
            raise VolumeError(f"{f}: no such file")
        ds = read_header(f)
        if ds is None:
            skipped += 1
            continue
        if not is_ct_mr_image(ds):
            sop = str(ds.get("SOPClassUID", "") or "?")
            kind = f"{ds.get('Modality', '?')} {sop}"
            others[kind] = others.get(kind, 0) + 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            raise VolumeError(f"{f}: a CT/MR image without SeriesInstanceUID; cannot group it into a series")
        series.setdefault(uid, []).append((f, ds))
    if not series:
        found = ", ".join(f"{n} x {k}" for k, n in sorted(others.items())) or "nothing"
        raise VolumeError(f"{where}: no CT/MR image series (DICOM found: {found}; {skipped} non-DICOM file(s))")
    if series_uid is not None:
        if series_uid not in series:
            names = "; ".join(_describe(u, it) for u, it in series.items())
            raise VolumeError(f"{where}: series {series_uid} not found; it holds {names}")
        uid = series_uid
    elif len(series) > 1:
        names = "; ".join(_describe(u, it) for u, it in sorted(series.items(), key=lambda kv: -len(kv[1])))
        raise VolumeError(f"{where}: holds {len(series)} CT/MR series; choose one (series_uid=...): {names}")
    else:
        uid = next(iter(series))
    if skipped or others:
        log.info("%s: %d non-DICOM and %d other DICOM file(s) left out", where, skipped, sum(others.values()))
    return where, uid, series[uid]


# ------------------------------------------------------------------------------------------ planes


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{where}: {what} is missing or not {n} numbers")
    return arr


def _number(value: Any, default: float) -> float:
    try:
        return default if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return default


def _is_mosaic(ds: Any) -> bool:
    image_type = ds.get("ImageType", []) or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "MOSAIC" for v in values)


def _check_pixel_module(ds: Any, where: str) -> None:
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{where}: colour images (SamplesPerPixel {ds.SamplesPerPixel}) are not a CT/MR volume")
    if int(ds.get("BitsAllocated", 16) or 16) not in (8, 16):
        raise VolumeError(f"{where}: BitsAllocated {ds.BitsAllocated} is not supported (8 or 16)")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise VolumeError(f"{where}: float pixel data is not supported")


def classic_planes(uid: str, items: list[tuple[Path, Any]]) -> list[Plane]:
    """One Plane per single-frame instance; the per-file header checks."""
    planes = []
    for path, ds in items:
        where = f"series {uid}: {path}"
        if _is_mosaic(ds):
            raise VolumeError(f"{where}: a Siemens MOSAIC (several slices tiled into one image) is not supported; "
                              "convert the series with dcm2niix first")
        if _n_frames(ds) != 1:
            raise VolumeError(f"{where}: a multi-frame instance ({_n_frames(ds)} frames) among "
                              f"{len(items)} instances; a multi-frame volume must be a single enhanced file")
        _check_pixel_module(ds, where)
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            raise VolumeError(f"{where}: Rows/Columns missing") from None
        spacing = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing", where)
        planes.append(Plane(
            path=path, frame=None,
            ipp=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),
            iop=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where),
            spacing=(float(spacing[0]), float(spacing[1])), rows=rows, cols=cols,
            slope=_number(ds.get("RescaleSlope"), 1.0), intercept=_number(ds.get("RescaleIntercept"), 0.0),
            temporal=str(ds.get("TemporalPositionIdentifier", "") or ""),
        ))
    return planes


def _fg_value(fg: Any, shared: Any, seq: str, kw: str) -> Any:
    """A functional group attribute: the per-frame item's, else the shared one's, else None."""
    for group in (fg, shared):
        if group is None:
            continue
        items = group.get(seq) or []
        if items and kw in items[0]:
            return items[0][kw].value
    return None


def enhanced_planes(uid: str, path: Path, ds: Any) -> list[Plane]:
    """One Plane per frame of an enhanced (or legacy converted enhanced) multi-frame CT/MR file."""
    where = f"series {uid}: {path}"
    _check_pixel_module(ds, where)
    if _is_mosaic(ds):
        raise VolumeError(f"{where}: a Siemens MOSAIC is not supported; convert the series with dcm2niix first")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    n = _n_frames(ds)
    if len(per_frame) != n:
        raise VolumeError(f"{where}: {n} frames but {len(per_frame)} PerFrameFunctionalGroupsSequence items; "
                          "the frames' positions are unknown")
    rows, cols = int(ds.Rows), int(ds.Columns)
    planes = []
    for f, fg in enumerate(per_frame):
        fwhere = f"{where} frame {f + 1}"
        spacing = _floats(_fg_value(fg, shared, "PixelMeasuresSequence", "PixelSpacing"), 2, "PixelSpacing", fwhere)
        content = (fg.get("FrameContentSequence") or [None])[0]
        temporal = stack = ""
        if content is not None:
            temporal = str(content.get("TemporalPositionIndex", "") or "")
            stack = str(content.get("StackID", "") or "")
        planes.append(Plane(
            path=path, frame=f,
            ipp=_floats(_fg_value(fg, shared, "PlanePositionSequence", "ImagePositionPatient"), 3,
                        "ImagePositionPatient (PlanePositionSequence)", fwhere),
            iop=_floats(_fg_value(fg, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6,
                        "ImageOrientationPatient (PlaneOrientationSequence)", fwhere),
            spacing=(float(spacing[0]), float(spacing[1])), rows=rows, cols=cols,
            slope=_number(_fg_value(fg, shared, "PixelValueTransformationSequence", "RescaleSlope"),
                          _number(ds.get("RescaleSlope"), 1.0)),
            intercept=_number(_fg_value(fg, shared, "PixelValueTransformationSequence", "RescaleIntercept"),
                              _number(ds.get("RescaleIntercept"), 0.0)),
            temporal=temporal, stack=stack,
        ))
    return planes


# ---------------------------------------------------------------------------------------- geometry


@dataclass
class Geometry:
    order: list[int]  # plane indices sorted along the normal
    affine_lps: np.ndarray  # (i=column, j=row, k=slice) -> LPS mm
    spacing: float  # between slices along the normal, mm
    tilt_deg: float  # angle between the slice axis and the normal (0: not sheared)
    notes: list[str]


def check_geometry(planes: list[Plane], series: str) -> Geometry:
    """Sort ``planes`` along the slice normal and check that they form one regular 3D grid (see module doc)."""
    n = len(planes)
    if n < 2:
        raise VolumeError(f"series {series}: {n} image; a volume needs at least 2 slices")
    stacks = sorted({p.stack for p in planes})
    if len(stacks) > 1:
        raise VolumeError(f"series {series}: {len(stacks)} stacks (StackID {', '.join(stacks[:5])}) in one file; "
                          "several stacks are not one volume")
    temporal = sorted({p.temporal for p in planes})
    if len(temporal) > 1:
        raise VolumeError(f"series {series}: 4D: {len(temporal)} temporal positions (TemporalPosition "
                          f"{temporal[0]}..{temporal[-1]}) in one series; split it into 3D volumes first")
    iop0 = planes[0].iop
    distinct = [iop0]
    for p in planes:
        if not any(np.max(np.abs(p.iop - d)) <= IOP_TOL for d in distinct):
            distinct.append(p.iop)
    if len(distinct) > 1:
        bad = next(p for p in planes if np.max(np.abs(p.iop - iop0)) > IOP_TOL)
        raise VolumeError(f"series {series}: mixed orientations: {len(distinct)} different ImageOrientationPatient "
                          f"(e.g. {planes[0].where} and {bad.where}); a volume has one")
    grids = {(p.rows, p.cols) for p in planes}
    if len(grids) > 1:
        raise VolumeError(f"series {series}: images of different sizes {sorted(grids)}; a volume has one pixel grid")
    sp0 = np.array(planes[0].spacing)
    for p in planes:
        if np.max(np.abs(np.array(p.spacing) - sp0)) > max(1e-3, 1e-4 * float(sp0.max())):
            raise VolumeError(f"series {series}: PixelSpacing differs ({planes[0].where}: {tuple(sp0)}, "
                              f"{p.where}: {p.spacing})")
    if min(sp0) <= 0:
        raise VolumeError(f"series {series}: PixelSpacing {tuple(sp0)} is not positive")
    row, col = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise VolumeError(f"series {series}: ImageOrientationPatient {list(iop0)} is not two orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    dist = np.array([normal @ p.ipp for p in planes])
    order = [int(i) for i in np.argsort(dist, kind="stable")]
    d = dist[order]
    steps = np.diff(d)
    if np.any(steps < POS_TOL_MM):
        positions = len(np.unique(np.round(d / POS_TOL_MM)))
        raise VolumeError(f"series {series}: 4D or duplicated: {n} images at {positions} distinct slice positions "
                          "(several volumes in one series, e.g. time points or echoes); split it into 3D volumes first")
    step = float(np.median(steps))
    tol = max(POS_TOL_MM, REL_TOL * step)
    if np.max(np.abs(steps - step)) > tol:
        small = float(steps.min())
        multiples = steps / small
        near = np.abs(multiples - np.round(multiples)) * small <= max(POS_TOL_MM, REL_TOL * small)
        if np.all(near) and np.max(multiples) > 1.5:
            gaps = [i for i, m in enumerate(np.round(multiples)) if m > 1]
            missing = int(np.sum(np.round(multiples) - 1))
            i = gaps[0]
            raise VolumeError(
                f"series {series}: missing slices: {missing} slice(s) missing (gap of {steps[i]:.3g} mm between "
                f"{planes[order[i]].where} and {planes[order[i + 1]].where}, spacing {small:.4g} mm elsewhere)")
        raise VolumeError(f"series {series}: non-uniform slice spacing along the normal: {steps.min():.3g} to "
                          f"{steps.max():.3g} mm (tolerance {tol:.3g} mm); a volume needs one spacing "
                          "(split the series where the spacing changes)")
    ipp = np.array([planes[i].ipp for i in order])
    v = (ipp[-1] - ipp[0]) / (n - 1)
    off_line = np.linalg.norm(ipp - (ipp[0] + np.outer(np.arange(n), v)), axis=1)
    if np.max(off_line) > tol:
        k = int(np.argmax(off_line))
        raise VolumeError(f"series {series}: slice positions are not on one line ({planes[order[k]].where} is "
                          f"{off_line[k]:.3g} mm off); not one regular volume")
    along = float(v @ normal)
    inplane = float(np.linalg.norm(v - along * normal))
    tilt = math.degrees(math.atan2(inplane, along))
    notes = []
    if inplane > POS_TOL_MM / max(n - 1, 1) and abs(tilt) > 0.01:
        notes.append(f"sheared geometry (gantry tilt {tilt:.2f} degrees): each slice is shifted {inplane:.3g} mm "
                     "in-plane from the previous one; read with a sheared affine (voxels where the scanner put "
                     "them, nothing resampled)")
    else:
        tilt = 0.0
    cs, rs = planes[0].spacing[1], planes[0].spacing[0]
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = row * cs, col * rs, v, ipp[0]
    return Geometry(order=order, affine_lps=affine, spacing=along, tilt_deg=tilt, notes=notes)


# ------------------------------------------------------------------------------------------ pixels


def _output_dtype(planes: list[Plane], ds: Any) -> np.dtype:
    """The stored dtype when no rescale applies; int16 (uint16 for unsigned data with intercepts >= 0) when
    slopes are 1 and intercepts integers (widened to int32 by :func:`_put` if a slice does not fit); else
    float32."""
    bits_alloc = int(ds.get("BitsAllocated", 16) or 16)
    signed = bool(int(ds.get("PixelRepresentation", 0) or 0))
    slopes = np.array([p.slope for p in planes])
    intercepts = np.array([p.intercept for p in planes])
    if np.any(slopes != 1.0) or np.any(intercepts != np.round(intercepts)):
        return np.dtype(np.float32)
    if np.all(intercepts == 0):
        if bits_alloc == 8 and not signed:
            return np.dtype(np.uint8)
        return np.dtype(np.int16 if signed else np.uint16)
    return np.dtype(np.uint16 if not signed and intercepts.min() >= 0 else np.int16)


def _put(out: np.ndarray, k: int, stored: np.ndarray, plane: Plane) -> np.ndarray:
    """Slice ``k`` (stored values, rows x columns) rescaled into ``out``; returns ``out``, widened to int32
    first when the rescaled integers do not fit its dtype."""
    if stored.shape != (plane.rows, plane.cols):
        raise VolumeError(f"{plane.where}: decoded pixels are {stored.shape}, expected {(plane.rows, plane.cols)}")
    if out.dtype.kind == "f":
        out[:, :, k] = (stored.astype(np.float32) * np.float32(plane.slope) + np.float32(plane.intercept)).T
        return out
    values = stored.astype(np.int32) + int(plane.intercept) if plane.intercept else stored
    info = np.iinfo(out.dtype)
    if values.size and (int(values.min()) < info.min or int(values.max()) > info.max):
        out = out.astype(np.int32)
    out[:, :, k] = values.T
    return out


def read_dicom_series(src: str | Path | list[str | Path], series_uid: str | None = None) -> Volume:
    """Read a CT/MR DICOM series (a folder, a list of files, or one enhanced multi-frame file) into a Volume.

    ``series_uid`` picks one series where the folder holds several. See the module doc for the geometry rules
    and what is refused."""
    from medsr.io.dicom import iter_frames, read_dicom
    from medsr.io.image import ImageReadError

    where, uid, items = group_series(src, series_uid)
    enhanced = len(items) == 1 and _n_frames(items[0][1]) > 1
    if enhanced:
        path, ds = items[0]
        if "PerFrameFunctionalGroupsSequence" not in ds:
            raise VolumeError(f"series {uid}: {path}: a multi-frame image without per-frame functional groups "
                              "(the frames' positions are unknown)")
        planes = enhanced_planes(uid, path, ds)
    else:
        planes = classic_planes(uid, items)
    geo = check_geometry(planes, uid)
    first_ds = items[0][1]
    for _, ds in items:
        for kw in ("BitsAllocated", "PixelRepresentation"):
            if ds.get(kw) != first_ds.get(kw):
                raise VolumeError(f"series {uid}: {kw} differs between instances")
    dtype = _output_dtype(planes, first_ds)
    p0 = planes[0]
    out = np.empty((p0.cols, p0.rows, len(planes)), dtype=dtype)
    position = {idx: k for k, idx in enumerate(geo.order)}
    try:
        if enhanced:
            img = read_dicom(items[0][0])
            for f, stored in enumerate(iter_frames(img)):
                out = _put(out, position[f], stored, planes[f])
            del img
        else:
            for k, idx in enumerate(geo.order):
                img = read_dicom(planes[idx].path)
                out = _put(out, k, img.pixels, planes[idx])
                del img
    except ImageReadError as e:
        raise VolumeError(f"series {uid}: {e}") from None
    modality = str(first_ds.get("Modality", "") or "").upper() or None
    rescale_type = str(first_ds.get("RescaleType", "") or "").upper()
    units = "HU" if modality == "CT" and rescale_type in ("", "HU") else ""
    datasets = [items[0][1]] if enhanced else [items[i][1] for i in geo.order]
    source = Path(src) if not isinstance(src, (list, tuple)) else Path(items[0][0]).parent
    notes = [f"DICOM series {uid}: {len(planes)} slices, {geo.spacing:.4g} mm apart along the normal", *geo.notes]
    for note in geo.notes:
        log.warning("%s: %s", where, note)
    meta = VolumeMeta(source=source, format="dicom", units=units, series_uid=uid,
                      study_uid=str(first_ds.get("StudyInstanceUID", "") or "") or None, modality=modality,
                      datasets=datasets, notes=notes, tilt_deg=geo.tilt_deg)
    return Volume(out, LPS_TO_RAS @ geo.affine_lps, meta)


__all__ = ["CT_MR_SOP_CLASSES", "LPS_TO_RAS", "check_geometry", "group_series", "read_dicom_series"]
