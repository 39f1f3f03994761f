"""A derived DICOM series from a volume: one single-frame instance per slice ``k`` of the volume.

Geometry comes from the volume's affine (RAS -> LPS): ImageOrientationPatient from the i (row direction) and
j (column direction) axes, PixelSpacing from their lengths, ImagePositionPatient of slice k = the affine at
voxel (0, 0, k), SpacingBetweenSlices and SliceThickness = the slice step along the normal, SliceLocation = the
position along the normal (n . IPP). Patient, study and frame of reference are the source series' (same
StudyInstanceUID and FrameOfReferenceUID); identity and provenance are those of the 2D path
(:mod:`medsr.io.dicom_derive`): DERIVED\\SECONDARY, DerivationDescription, Contributing Equipment, Source Image
references (the source slices that bracket each output slice), SeriesNumber + 1000, JPEG 2000 lossless by
default. UIDs are deterministic: the series from (source series UID, weights sha256, factor), each instance
from the same plus its slice index.

Intensities: stored = round((value - intercept) / slope) with the source's RescaleSlope/Intercept, in a 16-bit
container of the source's signedness, so CT values in HU read back as the same HU (values outside the container
are clipped, and the count is logged).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from medsr.fsutil import os_error_reason
from medsr.volumes.dicom_series import LPS_TO_RAS
from medsr.volumes.volume import Volume, VolumeError

log = logging.getLogger("medsr.volumes")

LEGACY_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}

# per-slice or per-source facts that a derived slice must not inherit
_SLICE_TAGS = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "SliceLocation", "InstanceNumber", "ImagesInAcquisition", "InStackPositionNumber", "RescaleSlope",
    "RescaleIntercept", "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence", "DimensionIndexSequence", "DimensionOrganizationType", "FrameIncrementPointer",
    # padding marked in the source's stored values is not kept exact through the volume method
    "PixelPaddingValue", "PixelPaddingRangeLimit",
)


def _ds(v: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(v))


def _rescale(src: Any) -> tuple[float, float]:
    """The source's RescaleSlope/Intercept (top level, or an enhanced file's shared functional group)."""
    item = src
    shared = (src.get("SharedFunctionalGroupsSequence") or [None])[0]
    if "RescaleSlope" not in src and shared is not None and shared.get("PixelValueTransformationSequence"):
        item = shared.PixelValueTransformationSequence[0]
    try:
        return float(item.get("RescaleSlope", 1) or 1), float(item.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return 1.0, 0.0


def _template(src: Any) -> Any:
    """The source header every output slice starts from (copy_source_header: no pixels, no private tags),
    without per-slice facts. An enhanced multi-frame source becomes a classic CT/MR Image header."""
    from medsr.io.dicom_derive import copy_source_header

    tpl = copy_source_header(src)
    for kw in _SLICE_TAGS:
        if kw in tpl:
            delattr(tpl, kw)
    modality = str(src.get("Modality", "") or "").upper()
    if int(src.get("NumberOfFrames", 1) or 1) > 1:
        tpl.SOPClassUID = LEGACY_SOP_CLASS.get(modality, LEGACY_SOP_CLASS["CT"])
    return tpl


def _stored(values: np.ndarray, slope: float, intercept: float, signed: bool) -> tuple[np.ndarray, int]:
    """(stored 16-bit values, number clipped) for ``values`` in output units."""
    dt = np.int16 if signed else np.uint16
    info = np.iinfo(dt)
    if values.dtype.kind in "ui" and slope == 1.0 and intercept == round(intercept):
        raw = values.astype(np.int64) - int(intercept)
    else:
        raw = np.rint((values.astype(np.float64) - intercept) / slope)
    clipped = int(np.count_nonzero((raw < info.min) | (raw > info.max)))
    return np.clip(raw, info.min, info.max).astype(dt), clipped


def _uids(series_uid: str, model_id: str, factor: float, weights_sha256: str | None, syntax: Any,
          n: int) -> tuple[str, list[str]]:
    from pydicom.uid import generate_uid

    from medsr.io.dicom import SOFTWARE, UID_PREFIX
    from medsr.io.dicom_derive import identity

    ident = identity(model_id, factor, weights_sha256, syntax)
    series = str(generate_uid(UID_PREFIX, entropy_srcs=[SOFTWARE, "volume-series", series_uid, *ident]))
    sops = [str(generate_uid(UID_PREFIX, entropy_srcs=[SOFTWARE, "volume-sop", series_uid, *ident, f"slice:{k}"]))
            for k in range(n)]
    return series, sops


def _source_refs(source: Volume, normal: np.ndarray) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Positions along ``normal`` (LPS) and (SOP class, SOP instance) of the source's slices."""
    refs, pos = [], []
    for ds in source.meta.datasets:
        ipp = ds.get("ImagePositionPatient")
        refs.append((str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))))
        pos.append(float(normal @ np.array([float(v) for v in ipp])) if ipp else np.nan)
    return np.array(pos), refs


def _bracketing(pos: np.ndarray, refs: list[tuple[str, str]], d: float) -> list[tuple[str, str]]:
    if len(refs) == 1 or np.any(np.isnan(pos)):
        return refs[:1]
    order = np.argsort(pos)
    p = pos[order]
    i = int(np.searchsorted(p, d))
    picks = {int(order[min(max(i - 1, 0), len(p) - 1)]), int(order[min(i, len(p) - 1)])}
    return [refs[j] for j in sorted(picks)]


def write_dicom_series(
    volume: Volume,
    source: Volume,
    out_dir: str | Path,
    *,
    weights_sha256: str | None,
    model_id: str,
    factor: float,
    syntax: str | None = None,
    overwrite: bool = False,
    now: datetime | None = None,
) -> list[Path]:
    """Write ``volume`` (derived from the DICOM volume ``source``, e.g. upscaled ``factor`` x through-plane)
    as a new series in ``out_dir``: one instance per slice k, named ``00001.dcm`` ... in slice order. The folder
    is written beside its final place and renamed into it at the end (atomic); an existing ``out_dir`` is
    refused unless ``overwrite``. Returns the written files. See the module doc for every attribute."""
    from medsr.io.dicom_derive import encode_single_frame, parse_syntax, stamp_provenance

    out_dir = Path(out_dir)
    meta = source.meta
    if meta.format != "dicom" or not meta.datasets or not meta.series_uid:
        raise VolumeError(f"{out_dir}: a derived DICOM series needs a DICOM source volume (patient, study, frame of "
                          f"reference); the source is {meta.format or 'not DICOM'} ({meta.source})")
    if weights_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", weights_sha256):
        raise VolumeError(f"{out_dir}: weights_sha256 must be 64 hex digits (a sha256), or None")
    if not factor > 0:
        raise VolumeError(f"{out_dir}: factor must be positive, not {factor}")
    try:
        syn = parse_syntax(syntax)
    except ValueError as e:
        raise VolumeError(f"{out_dir}: {e}") from None
    if out_dir.exists() and not overwrite:
        raise VolumeError(f"{out_dir}: exists; refusing to overwrite it (pass overwrite=True)")
    if not out_dir.parent.is_dir():
        raise VolumeError(f"{out_dir}: the folder {out_dir.parent} does not exist")

    aff = LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)  # voxel -> LPS
    ci, cj, ck = aff[:3, 0], aff[:3, 1], aff[:3, 2]
    sx, sy = float(np.linalg.norm(ci)), float(np.linalg.norm(cj))
    if sx <= 0 or sy <= 0:
        raise VolumeError(f"{out_dir}: the volume's affine has a zero in-plane axis")
    row, col = ci / sx, cj / sy
    if abs(float(row @ col)) > 1e-4:
        raise VolumeError(f"{out_dir}: the volume's i and j axes are not orthogonal (in-plane shear); "
                          "DICOM images cannot hold that")
    normal = np.cross(row, col)
    step = float(ck @ normal)
    if abs(step) < 1e-6:
        raise VolumeError(f"{out_dir}: the volume's slice axis lies in the image plane")

    src0 = meta.datasets[0]
    tpl = _template(src0)
    slope, intercept = _rescale(src0)
    signed = bool(int(src0.get("PixelRepresentation", 1 if meta.units == "HU" else 0) or 0))
    is_ct = str(src0.get("Modality", "")).upper() == "CT"
    write_rescale = is_ct or "RescaleSlope" in src0 or (slope, intercept) != (1.0, 0.0)
    n = volume.shape[2]
    series_uid, sops = _uids(meta.series_uid, model_id, factor, weights_sha256, syn, n)
    src_pos, src_refs = _source_refs(source, normal)
    what = f"Through-plane super-resolution x{factor:g}"

    tmp = out_dir.parent / f".{out_dir.name[:200]}.medsr-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
    except OSError as e:
        raise VolumeError(f"{out_dir}: cannot create a folder beside it ({os_error_reason(e, out_dir.parent)})") from None
    files: list[Path] = []
    clipped = 0
    try:
        for k in range(n):
            ds = _one_slice(tpl, k, aff, row, col, normal, sx, sy, abs(step), series_uid, sops[k])
            stamp_provenance(ds, src0, what=what, series_tag=f"SR x{factor:g}", model_id=model_id,
                             weights_sha256=weights_sha256, now=now,
                             sources=_bracketing(src_pos, src_refs, float(normal @ aff[:3, 3] + k * step)))
            if write_rescale:
                ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
                if is_ct and "RescaleType" not in ds and meta.units == "HU":
                    ds.RescaleType = "HU"
            values = np.asarray(volume.array[:, :, k]).T
            if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
                raise VolumeError(f"{out_dir}: slice {k + 1} of the volume holds NaN or infinite values")
            pixels, c = _stored(values, slope, intercept, signed)
            clipped += c
            ds.BitsStored = 16
            try:
                out = encode_single_frame(ds, np.ascontiguousarray(pixels), syn)
            except ValueError as e:
                raise VolumeError(f"{out_dir}: slice {k + 1}: {e}") from None
            path = tmp / f"{k + 1:05d}.dcm"
            try:
                out.save_as(path, enforce_file_format=True)
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            except OSError as e:
                raise VolumeError(f"{out_dir}: cannot write ({os_error_reason(e, out_dir.parent)})") from None
            files.append(out_dir / path.name)
        if clipped:
            log.warning("%s: %d voxel(s) outside the 16-bit stored range were clipped", out_dir, clipped)
        _replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def _one_slice(tpl: Any, k: int, aff: np.ndarray, row: np.ndarray, col: np.ndarray, normal: np.ndarray,
               sx: float, sy: float, step: float, series_uid: str, sop_uid: str) -> Any:
    import copy

    from pydicom.dataset import FileMetaDataset

    import medsr
    from medsr.io.dicom_derive import IMPLEMENTATION_CLASS_UID

    ds = copy.deepcopy(tpl)
    sop_class = str(ds.get("SOPClassUID", LEGACY_SOP_CLASS["CT"]))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = f"MEDSR_{medsr.__version__}"[:16]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    old_type = [str(v) for v in (ds.get("ImageType") or [])] if not isinstance(ds.get("ImageType"), str) else []
    ds.ImageType = ["DERIVED", "SECONDARY", *old_type[2:]]
    ipp = aff[:3, :3] @ np.array([0.0, 0.0, float(k)]) + aff[:3, 3]
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    ds.PixelSpacing = [_ds(sy), _ds(sx)]  # (between rows, between columns)
    ds.SliceThickness = _ds(step)
    ds.SpacingBetweenSlices = _ds(step)
    ds.SliceLocation = _ds(float(normal @ ipp))
    if "PhotometricInterpretation" not in ds:
        ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir`` (an existing one is moved aside first, then removed)."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise VolumeError(f"{out_dir}: appeared while writing; refusing to overwrite it")
        old = out_dir.parent / f".{out_dir.name[:200]}.medsr-{os.getpid()}-{secrets.token_hex(4)}.old"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(out_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["write_dicom_series"]
