"""The derived (super-resolved) DICOM instance: identity, provenance, time, geometry, encoding.

Everything a PACS sees of medsr's output is decided here (conformance statement: docs/io.md).
Inputs are explicit: the model id, the weights' sha256, the scale and the output transfer syntax;
nothing here knows about backends. Patient data is copied, never logged or put into messages.

Pixel-grid convention (used for ImagePositionPatient, shutters, collimators, overlays, regions):
LR pixel ``i`` (0-based) covers ``[i, i+1)`` in LR pixel units, its centre is at ``i + 0.5``; the
output grid covers the same extent with ``scale`` x more pixels, so HR pixel ``j`` covers
``[j/s, (j+1)/s)``. This is the half-pixel (area, ``align_corners=False``) convention of the
bicubic/area degradations medsr's models are trained on and of the RRDB's nearest upsampling;
``tests/test_dicom_derive.py`` checks it against the runtime's actual output. The first HR pixel
centre therefore lies ``(s - 1) / (2 s)`` LR pixels before the first LR pixel centre.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medsr.io.base import Image, ImageWriteError
from medsr.io.dicom import _LOSSY_TS, _PIXEL_TAGS, SOFTWARE, UID_PREFIX, _as_list, _code_item, _quiet
from medsr.io.provenance import format_provenance

log = logging.getLogger("medsr.io")

#: medsr's Implementation Class UID (file meta), fixed: generate_uid(UID_PREFIX, ["medsr", "ImplementationClassUID"])
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.71587282328681036189832039045964205790"
#: derived series number = source SeriesNumber + SERIES_NUMBER_OFFSET (or the offset alone)
SERIES_NUMBER_OFFSET = 1000
#: default JPEG 2000 lossy compression ratio when ``jpeg2000-lossy`` is asked for without one
DEFAULT_LOSSY_RATIO = 10.0

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
_J2K = "1.2.840.10008.1.2.4.91"
_RLE = "1.2.840.10008.1.2.5"

#: --dicom-syntax names -> transfer syntax UID
SYNTAX_NAMES: dict[str, str] = {
    "jpeg2000-lossless": _J2K_LOSSLESS,
    "rle": _RLE,
    "explicit-le": _EXPLICIT_LE,
    "jpeg2000-lossy": _J2K,
}
_ALIASES = {"j2k": "jpeg2000-lossless", "jpeg2000": "jpeg2000-lossless", "rle-lossless": "rle",
            "uncompressed": "explicit-le", "explicit": "explicit-le", "j2k-lossy": "jpeg2000-lossy"}
DEFAULT_SYNTAX = "jpeg2000-lossless"

# dropped on derivation (besides pixel data, icons and private tags): no longer true for the new instance
_DROP_TAGS = {
    0x00080014,  # InstanceCreatorUID: the source's creator, not medsr
    0x04000500,  # EncryptedAttributesSequence
    0x4FFE0001,  # MACParametersSequence: signatures over the source's bytes
    0xFFFAFFFA,  # DigitalSignaturesSequence
    0xFFFCFFFC,  # DataSetTrailingPadding
    0x00280008,  # NumberOfFrames: set from the output
}


# ------------------------------------------------------------------------------------------ syntax


@dataclass(frozen=True)
class OutputSyntax:
    """How the output's pixel data is encoded. ``chosen``: asked for explicitly (no fallback)."""

    name: str
    uid: str
    ratio: float | None = None  # JPEG 2000 lossy target compression ratio
    chosen: bool = True

    @property
    def lossy(self) -> bool:
        return self.ratio is not None

    @property
    def compressed(self) -> bool:
        return self.uid != _EXPLICIT_LE


def parse_syntax(spec: str | OutputSyntax | None) -> OutputSyntax:
    """``None`` -> the default (JPEG 2000 lossless, RLE lossless when an image is too small for it);
    ``jpeg2000-lossless``, ``rle``, ``explicit-le`` or ``jpeg2000-lossy[:RATIO]`` (default ratio 10).
    ValueError naming the choices otherwise."""
    if isinstance(spec, OutputSyntax):
        return spec
    if spec is None or str(spec).strip() == "":
        return OutputSyntax(DEFAULT_SYNTAX, SYNTAX_NAMES[DEFAULT_SYNTAX], chosen=False)
    text = str(spec).strip().lower()
    name, _, arg = text.partition(":")
    name = _ALIASES.get(name, name)
    choices = "jpeg2000-lossless (default), rle, explicit-le, jpeg2000-lossy[:RATIO]"
    if name not in SYNTAX_NAMES:
        raise ValueError(f"unknown DICOM output syntax {spec!r}; choose one of {choices}")
    if name != "jpeg2000-lossy":
        if arg:
            raise ValueError(f"DICOM output syntax {name} takes no ':{arg}' (only jpeg2000-lossy:RATIO does)")
        return OutputSyntax(name, SYNTAX_NAMES[name])
    try:
        ratio = float(arg) if arg else DEFAULT_LOSSY_RATIO
    except ValueError:
        raise ValueError(f"jpeg2000-lossy:{arg}: the ratio must be a number >= 1 (e.g. jpeg2000-lossy:10)") from None
    if not ratio >= 1.0 or ratio > 1000:
        raise ValueError(f"jpeg2000-lossy:{arg}: the ratio must lie in [1, 1000]")
    return OutputSyntax(name, _J2K, ratio=ratio)


# -------------------------------------------------------------------------------------------- UIDs


def identity(model_id: str, scale: float, weights_sha256: str | None, syntax: OutputSyntax | None = None,
             provenance: Mapping[str, str] | None = None) -> list[str]:
    """What decides the output pixels, as UID entropy: the weights (their sha256; the model id only
    when no hash is known), the scale (an integer for 2D, any ratio for volumes: ``x2``, ``x2.5``), the runtime
    and precision that ran them (from ``provenance``, see :mod:`medsr.io.provenance`; left out when None) and a
    lossy encoding. Tile size, overlap, batch, device and lossless syntax are left out by design (docs/io.md)."""
    parts = [f"weights-sha256:{weights_sha256.lower()}" if weights_sha256 else f"model-id:{model_id}", f"x{float(scale):g}"]
    if provenance is not None:
        parts += [f"runtime:{provenance.get('runtime', '?')}", f"precision:{provenance.get('precision', '?')}"]
    if syntax is not None and syntax.lossy:
        parts.append(f"lossy:{syntax.uid}:{syntax.ratio:g}")
    return parts


def derived_uids(
    src_ds: Any, model_id: str, scale: int, *, weights_sha256: str | None = None, syntax: OutputSyntax | None = None,
    provenance: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """(SOPInstanceUID, SeriesInstanceUID) of the output: deterministic in (source UIDs, weights
    sha256 or model id, scale, runtime and precision when ``provenance`` is given, lossy encoding), different
    from the source's. A source without UIDs:
    its pixel data hash stands in."""
    from pydicom.uid import generate_uid

    sop = str(src_ds.get("SOPInstanceUID", "") or "")
    series = str(src_ds.get("SeriesInstanceUID", "") or "")
    if not sop:
        data = src_ds.get("PixelData", b"") or b""
        sop = "sha256:" + hashlib.sha256(data if isinstance(data, bytes) else b"").hexdigest()
    if not series:
        series = "series-of:" + sop
    ident = identity(model_id, scale, weights_sha256, syntax, provenance)
    new_sop = generate_uid(UID_PREFIX, entropy_srcs=[SOFTWARE, "sop", sop, *ident])
    new_series = generate_uid(UID_PREFIX, entropy_srcs=[SOFTWARE, "series", series, *ident])
    return str(new_sop), str(new_series)


# -------------------------------------------------------------------------------------------- time


_TZ_RE = re.compile(r"^[+-](\d\d)(\d\d)$")


def _source_tz(src_ds: Any) -> timezone | None:
    value = str(src_ds.get("TimezoneOffsetFromUTC", "") or "").strip()
    m = _TZ_RE.match(value)
    if not value:
        return None
    if not m or int(m.group(1)) > 14 or int(m.group(2)) >= 60:
        log.warning("derived DICOM: TimezoneOffsetFromUTC is not +HHMM/-HHMM; new times are in host local time")
        return None
    delta = timedelta(hours=int(m.group(1)), minutes=int(m.group(2)))
    return timezone(-delta if value[0] == "-" else delta)


def _stamp(src_ds: Any, now: datetime | None) -> tuple[datetime, str]:
    """(local time to write, DT with offset). With a source TimezoneOffsetFromUTC the new times are
    written in that offset (the offset applies to every time in the instance); without one, in the
    host's local time (a naive ``now`` is taken as host local time)."""
    tz = _source_tz(src_ds)
    moment = now if now is not None else datetime.now().astimezone()
    if tz is not None:
        local = (moment if moment.tzinfo else moment.astimezone()).astimezone(tz)
    else:
        local = moment.astimezone() if moment.tzinfo else moment
    aware = local if local.tzinfo else local.astimezone()
    off = aware.utcoffset() or timedelta(0)
    minutes = int(off.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    dt = f"{aware:%Y%m%d%H%M%S.%f}{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return local, dt


# ---------------------------------------------------------------------------------------- geometry


def _floats(value: Any) -> list[float]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes, int, float)) or not hasattr(value, "__iter__"):
        return [float(value)]
    return [float(v) for v in value]


def _ds(v: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(v))


def _scale_spacing(item: Any, keyword: str, scale: int, where: str) -> bool:
    """Divide a spacing pair by ``scale``; True if it is present, valid and non-zero after this."""
    if keyword not in item or item[keyword].value in (None, "", []):
        return False
    try:
        values = _floats(item[keyword].value)
    except (TypeError, ValueError):
        values = []
    if len(values) != 2:
        log.warning("%s: %s is not a pair of numbers; removed (spacing unknown)", where, keyword)
        del item[keyword]
        return False
    if any(v == 0 for v in values):
        log.warning("%s: %s is zero in the source; kept zero (spacing unknown, not scaled)", where, keyword)
        return False
    item[keyword].value = [_ds(v / scale) for v in values]
    return all(v > 0 for v in values)


def _shift_position(item: Any, iop: list[float] | None, spacing: list[float] | None, scale: int) -> bool:
    """Move ImagePositionPatient of ``item`` to the centre of the first HR pixel. ``spacing`` is
    the LR PixelSpacing (row spacing, column spacing). False if it cannot be computed."""
    try:
        ipp = _floats(item.ImagePositionPatient)
    except (TypeError, ValueError, AttributeError):
        return False
    if len(ipp) != 3 or not iop or len(iop) != 6 or not spacing or len(spacing) != 2 or min(spacing) <= 0:
        return False
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    shift = (scale - 1) / (2 * scale) * (spacing[1] * row_dir + spacing[0] * col_dir)
    item.ImagePositionPatient = [_ds(v) for v in np.array(ipp) - shift]
    return True


def _first(item: Any, seq_kw: str, kw: str) -> Any:
    seq = item.get(seq_kw) if item is not None else None
    if seq and kw in seq[0]:
        return seq[0][kw].value
    return None


def _try_floats(value: Any) -> list[float] | None:
    try:
        return _floats(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _scale_geometry(ds: Any, scale: int, where: str) -> bool:
    """Scale every pixel-based attribute; returns False when a patient position could not be
    recomputed (then the frame of reference is no longer shared with the source)."""
    consistent = True
    # top level (cross-sectional images): position first, with the LR spacing
    if "ImagePositionPatient" in ds:
        ok = _shift_position(ds, _try_floats(ds.get("ImageOrientationPatient")), _try_floats(ds.get("PixelSpacing")), scale)
        consistent &= ok
    for kw in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        _scale_spacing(ds, kw, scale, where)
    # enhanced multi-frame: Shared / PerFrame functional groups
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    for fg_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for fg in ds.get(fg_kw) or []:
            if "PlanePositionSequence" in fg:
                iop = _try_floats(_first(fg, "PlaneOrientationSequence", "ImageOrientationPatient")
                                  or _first(shared, "PlaneOrientationSequence", "ImageOrientationPatient"))
                spacing = _try_floats(_first(fg, "PixelMeasuresSequence", "PixelSpacing")
                                      or _first(shared, "PixelMeasuresSequence", "PixelSpacing"))
                for pos in fg.PlanePositionSequence:
                    if "ImagePositionPatient" in pos:
                        consistent &= _shift_position(pos, iop, spacing, scale)
    for fg_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):  # spacing after all positions
        for fg in ds.get(fg_kw) or []:
            for pm in fg.get("PixelMeasuresSequence") or []:
                _scale_spacing(pm, "PixelSpacing", scale, where)
            for frame_type_seq in [e for e in fg if e.VR == "SQ"]:
                for it in frame_type_seq.value or []:
                    if "FrameType" in it:  # e.g. MRImageFrameTypeSequence: this frame is derived now
                        ft = [str(v) for v in _as_list(it.FrameType)]
                        it.FrameType = ["DERIVED", "SECONDARY", *ft[2:]] if len(ft) >= 2 else ["DERIVED", "SECONDARY"]
    _scale_edges(ds, scale, ("ShutterLeftVerticalEdge", "ShutterRightVerticalEdge", "ShutterUpperHorizontalEdge",
                             "ShutterLowerHorizontalEdge"))
    _scale_edges(ds, scale, ("CollimatorLeftVerticalEdge", "CollimatorRightVerticalEdge",
                             "CollimatorUpperHorizontalEdge", "CollimatorLowerHorizontalEdge"))
    for kw in ("CenterOfCircularShutter", "VerticesOfThePolygonalShutter", "CenterOfCircularCollimator",
               "VerticesOfThePolygonalCollimator"):
        _scale_points(ds, kw, scale)
    for kw in ("RadiusOfCircularShutter", "RadiusOfCircularCollimator"):
        if kw in ds and ds[kw].value not in (None, ""):
            ds[kw].value = int(ds[kw].value) * scale
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        _scale_us_region(region, scale)
    for item in ds.get("MaskSubtractionSequence") or []:  # XA mask shift, in pixels
        if "MaskSubPixelShift" in item and item.MaskSubPixelShift not in (None, ""):
            item.MaskSubPixelShift = [float(v) * scale for v in _floats(item.MaskSubPixelShift)]
    return consistent


def _scale_edges(ds: Any, scale: int, kws: tuple[str, str, str, str]) -> None:
    """Rectangular shutter/collimator edges are 1-based pixel columns/rows: the first edge maps
    to the first HR pixel of its LR pixel, the last edge to the last HR pixel of its LR pixel."""
    for kw, first in zip(kws, (True, False, True, False), strict=True):
        if kw in ds and ds[kw].value not in (None, ""):
            v = int(ds[kw].value)
            ds[kw].value = (v - 1) * scale + 1 if first else v * scale


def _scale_points(ds: Any, kw: str, scale: int) -> None:
    """1-based (row, column) pixel positions (pixel centres) mapped to the HR grid."""
    if kw in ds and ds[kw].value not in (None, ""):
        ds[kw].value = [int(np.floor((float(v) - 0.5) * scale + 1.0)) for v in _floats(ds[kw].value)]


def _scale_us_region(region: Any, scale: int) -> None:
    """Ultrasound regions: 0-based pixel bounds and physical size per pixel."""
    for kw in ("RegionLocationMinX0", "RegionLocationMinY0"):
        if kw in region:
            region[kw].value = int(region[kw].value) * scale
    for kw in ("RegionLocationMaxX1", "RegionLocationMaxY1"):
        if kw in region:
            region[kw].value = (int(region[kw].value) + 1) * scale - 1
    for kw in ("ReferencePixelX0", "ReferencePixelY0"):  # a pixel centre relative to the region origin
        if kw in region:
            region[kw].value = int(round((float(region[kw].value) + 0.5) * scale - 0.5))
    for kw in ("PhysicalDeltaX", "PhysicalDeltaY"):
        if kw in region and region[kw].value not in (None, ""):
            region[kw].value = float(region[kw].value) / scale


# ---------------------------------------------------------------------------------------- overlays


def _overlay_groups(ds: Any) -> list[int]:
    return sorted({e.tag.group for e in ds if 0x6000 <= e.tag.group <= 0x601E and e.tag.group % 2 == 0})


def _scale_overlays(src_ds: Any, ds: Any, scale: int, where: str) -> None:
    """Overlay planes (60xx) are bitmaps in pixel units: upscaled by pixel replication (they are
    graphics: marks and annotations stay sharp and registered). Overlays embedded in unused pixel
    bits (no OverlayData) cannot survive resampling and are dropped."""
    for g in _overlay_groups(src_ds):
        elems = [e for e in src_ds if e.tag.group == g]
        data_el = src_ds.get((g, 0x3000))
        try:
            rows, cols = int(src_ds[g, 0x0010].value), int(src_ds[g, 0x0011].value)
            frames = int(src_ds[g, 0x0015].value) if (g, 0x0015) in src_ds else 1
            bits_alloc = int(src_ds[g, 0x0100].value) if (g, 0x0100) in src_ds else 1
            if data_el is None or bits_alloc != 1:
                raise ValueError("embedded in pixel data")
            raw = bytes(data_el.value)
            n = rows * cols * frames
            bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
            if bits.size < n:
                raise ValueError("short overlay data")
        except (KeyError, TypeError, ValueError):
            log.warning("%s: overlay group %04X cannot be resampled (embedded or incomplete); dropped", where, g)
            continue
        plane = bits[:n].reshape(frames, rows, cols)
        up = plane.repeat(scale, axis=1).repeat(scale, axis=2)
        packed = np.packbits(up.ravel(), bitorder="little").tobytes()
        if len(packed) % 2:
            packed += b"\0"
        for e in elems:
            ds.add(copy.deepcopy(e))
        ds[g, 0x0010].value, ds[g, 0x0011].value = rows * scale, cols * scale
        if (g, 0x0050) in ds:  # OverlayOrigin: 1-based row, column of the overlay's first pixel
            ds[g, 0x0050].value = [(int(v) - 1) * scale + 1 for v in _floats(ds[g, 0x0050].value)]
        if (g, 0x1301) in ds and ds[g, 0x1301].value not in (None, ""):  # ROIArea, in pixels
            ds[g, 0x1301].value = int(ds[g, 0x1301].value) * scale * scale
        ds[g, 0x3000].value = packed


# ------------------------------------------------------------------------------------------ pixels


def finish_pixels(src_ds: Any, lr: np.ndarray | None, hr: np.ndarray, scale: int) -> np.ndarray:
    """Clip ``hr`` to the source's BitsStored range and restore Pixel Padding: HR pixels whose LR
    pixel was padding (PixelPaddingValue, or the range up to PixelPaddingRangeLimit) get the
    padding value again (nearest), so padding stays exactly padding. Returns a new array."""
    signed = bool(int(src_ds.get("PixelRepresentation", 0)))
    bits = min(int(src_ds.get("BitsStored", src_ds.BitsAllocated)), hr.dtype.itemsize * 8)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    out = np.clip(hr, lo, hi).astype(hr.dtype, copy=False)
    if out is hr:
        out = hr.copy()
    pad = src_ds.get("PixelPaddingValue")
    if pad is None or lr is None or lr.ndim != 2 or pad == "":
        return out
    try:
        v = int(pad)
        limit = src_ds.get("PixelPaddingRangeLimit")
        a, b = (v, v) if limit in (None, "") else (min(v, int(limit)), max(v, int(limit)))
    except (TypeError, ValueError):
        return out
    mask = (lr >= a) & (lr <= b)
    if mask.any():
        out[np.repeat(np.repeat(mask, scale, 0), scale, 1)] = np.clip(v, lo, hi)
    return out


def _pixel_module(ds: Any, shape: tuple[int, ...], dtype: np.dtype, photometric: str, bits_stored: int, frames: int) -> None:
    rows, cols = int(shape[0]), int(shape[1])
    samples = 1 if len(shape) == 2 else int(shape[2])
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    ds.BitsAllocated = dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames


class _Encoder:
    """Encodes frames one at a time in the output transfer syntax (bounded memory: only the
    encoded frames are kept), falling back from the default JPEG 2000 to RLE lossless when
    OpenJPEG cannot encode an image this small."""

    def __init__(self, ds: Any, syntax: OutputSyntax) -> None:
        self.ds = ds
        self.frames: list[bytes] = []
        self.raw_bytes = 0
        self._use(syntax)

    def _use(self, syntax: OutputSyntax) -> None:
        self.syntax = syntax
        if int(self.ds.SamplesPerPixel) == 3:  # colour in JPEG 2000: with the component transform (PS3.5 8.2.4)
            self.ds.PhotometricInterpretation = {_J2K_LOSSLESS: "YBR_RCT", _J2K: "YBR_ICT"}.get(syntax.uid, "RGB")

    def add(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<"))
        self.raw_bytes += frame.nbytes
        if not self.syntax.compressed:
            self.frames.append(frame.tobytes())
            return
        try:
            self.frames.append(self._encode(frame))
        except Exception as e:
            if self.syntax.chosen or self.frames or self.syntax.uid != _J2K_LOSSLESS:
                why = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
                small = min(frame.shape[:2]) < 32 and self.syntax.uid in (_J2K, _J2K_LOSSLESS)
                hint = " (JPEG 2000 needs at least 32 x 32 pixels)" if small else ""
                raise ValueError(
                    f"cannot encode the DICOM output as {self.syntax.name}{hint}: {why}; "
                    "choose another --dicom-syntax (rle, explicit-le)"
                ) from None
            log.info("derived DICOM: %s cannot encode a %dx%d image; using RLE lossless",
                     self.syntax.name, frame.shape[1], frame.shape[0])
            self._use(OutputSyntax("rle", _RLE, chosen=False))
            self.frames.append(self._encode(frame))

    def _encode(self, frame: np.ndarray) -> bytes:
        from pydicom.pixels import get_encoder
        from pydicom.pixels.utils import as_pixel_options

        encoder = get_encoder(self.syntax.uid)
        if not encoder.is_available:
            raise RuntimeError(f"no encoder available ({'; '.join(encoder.missing_dependencies)})")
        opts = as_pixel_options(self.ds, number_of_frames=1)
        if self.syntax.lossy:
            opts["j2k_cr"] = [self.syntax.ratio]
        return bytes(encoder.encode(frame, **opts))

    def finish(self) -> OutputSyntax:
        from pydicom.encaps import encapsulate, encapsulate_extended
        from pydicom.uid import UID

        ds = self.ds
        for tag in (0x7FE00001, 0x7FE00002):
            if tag in ds:
                del ds[tag]
        if not self.syntax.compressed:
            data = b"".join(self.frames)
            ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
            ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
        else:
            total = sum(len(f) + 8 for f in self.frames)
            if total > 2**32 - 1:
                ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(self.frames)
            else:
                ds.PixelData = encapsulate(self.frames)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = UID(self.syntax.uid)
        self.frames = []
        return self.syntax


# ---------------------------------------------------------------------------------------- derive


def derive_dicom(
    src_ds: Any,
    pixels: np.ndarray,
    scale: int,
    model_id: str,
    *,
    weights_sha256: str | None = None,
    syntax: str | OutputSyntax | None = None,
    now: datetime | None = None,
    source_pixels: np.ndarray | None = None,
    provenance: Mapping[str, str] | None = None,
) -> Any:
    """The derived (super-resolved) instance for single-frame ``pixels`` (stored values, ``scale``
    x the source size, same dtype/BitsStored/photometric as read by :func:`medsr.io.read_image`),
    encoded in ``syntax`` (default JPEG 2000 lossless). Returns a pydicom ``FileDataset`` (preamble,
    file meta) that ``save_as`` writes as a valid Part 10 file. The source is not modified.

    ``source_pixels`` (the LR stored values) restores Pixel Padding exactly. ``now`` (default: the
    current time) sets the derivation date/time. ``provenance`` (:mod:`medsr.io.provenance`: runtime,
    precision...) enters the UIDs and the ContributingEquipmentSequence. See docs/io.md for every attribute set.
    """
    frames = int(src_ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ValueError(f"derive_dicom takes one frame; the source has {frames} (use derive_frames)")
    hdr = _Header(src_ds, pixels.shape, pixels.dtype, scale, model_id, weights_sha256, parse_syntax(syntax), now, 1,
                  provenance)
    enc = _Encoder(hdr.ds, hdr.syntax)
    enc.add(finish_pixels(src_ds, source_pixels, pixels, scale))
    return hdr.finish(enc)


def derive_frames(
    img: Image,
    upscale: Callable[[Image], np.ndarray],
    scale: int,
    model_id: str,
    *,
    weights_sha256: str | None = None,
    syntax: str | OutputSyntax | None = None,
    now: datetime | None = None,
    provenance: Mapping[str, str] | None = None,
) -> Image:
    """Upscale a multi-frame DICOM ``img`` frame by frame with ``upscale`` (a one-frame Image ->
    stored HR pixels) into one derived multi-frame instance. Memory: one LR frame, one HR frame and
    the encoded output (all of it for explicit-le). ``Image.pixels`` of the result is its first
    frame; the dataset holds all of them."""
    from medsr.io.dicom import iter_frames

    n = img.frames
    first: np.ndarray | None = None
    hdr: _Header | None = None
    enc: _Encoder | None = None
    for i, lr in enumerate(iter_frames(img)):
        frame_img = replace(img, pixels=lr, meta={**img.meta, "frames": 1, "frame_index": i})
        hr = upscale(frame_img)
        if hr.dtype != img.dtype or hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
            raise ValueError(f"frame {i}: upscaled frame is {hr.shape} {hr.dtype}, expected x{scale} of {lr.shape} {img.dtype}")
        if hdr is None:
            hdr = _Header(img.dataset, hr.shape, hr.dtype, scale, model_id, weights_sha256, parse_syntax(syntax), now, n,
                          provenance)
            enc = _Encoder(hdr.ds, hdr.syntax)
        out = finish_pixels(img.dataset, lr, hr, scale)
        assert enc is not None
        enc.add(out)
        if first is None:
            first = out
        del hr, out
    if hdr is None or enc is None or first is None:
        raise ValueError("multi-frame DICOM has no frames")
    ds = hdr.finish(enc)
    meta = {**img.meta, "scale": scale, "model_id": model_id, "frames": n, "dicom_syntax": ds._medsr_syntax}
    return Image(pixels=first, format="dicom", max_value=img.max_value, photometric=img.photometric,
                 path=None, dataset=ds, meta=meta)


class _Header:
    """Everything but the pixel data; ``finish`` adds the encoded frames and the lossy bookkeeping."""

    def __init__(
        self, src_ds: Any, shape: tuple[int, ...], dtype: np.dtype, scale: int, model_id: str,
        weights_sha256: str | None, syntax: OutputSyntax, now: datetime | None, frames: int,
        provenance: Mapping[str, str] | None = None,
    ) -> None:
        if scale < 1:
            raise ValueError(f"scale must be >= 1, not {scale}")
        rows, cols = int(src_ds.Rows), int(src_ds.Columns)
        if tuple(shape[:2]) != (rows * scale, cols * scale):
            raise ValueError(f"pixels are {tuple(shape[:2])}, expected {(rows * scale, cols * scale)} for x{scale}")
        if dtype.kind not in "ui" or dtype.itemsize not in (1, 2):
            raise ValueError(f"pixels must be uint8/uint16/int16, not {dtype}")
        signed = bool(int(src_ds.get("PixelRepresentation", 0)))
        if signed != (dtype.kind == "i"):
            raise ValueError(f"pixels dtype {dtype} does not match PixelRepresentation {int(signed)}")
        if weights_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", weights_sha256):
            raise ValueError("weights_sha256 must be 64 hex digits (a sha256), or None")
        self.src, self.scale, self.model_id, self.weights_sha256 = src_ds, scale, model_id, weights_sha256
        self.syntax = syntax
        self.provenance = dict(provenance) if provenance is not None else None
        with _quiet("derive_dicom"):
            self.ds = self._build(shape, dtype, now, frames)

    def _build(self, shape: tuple[int, ...], dtype: np.dtype, now: datetime | None, frames: int) -> Any:
        from pydicom.dataset import FileMetaDataset

        import medsr

        src, scale, model_id = self.src, self.scale, self.model_id
        where = "derived DICOM"
        ds = copy_source_header(src)  # overlays: re-added scaled below

        new_sop, new_series = derived_uids(src, model_id, scale, weights_sha256=self.weights_sha256, syntax=self.syntax,
                                       provenance=self.provenance)
        sop_class = src.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = new_sop
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        ds.file_meta.ImplementationVersionName = f"MEDSR_{medsr.__version__}"[:16]
        ds.file_meta.TransferSyntaxUID = self.syntax.uid
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = new_sop
        ds.SeriesInstanceUID = new_series

        src_photometric = str(src.PhotometricInterpretation).strip().upper()
        photometric = "RGB" if int(src.SamplesPerPixel) == 3 else src_photometric
        bits_stored = min(int(src.get("BitsStored", src.BitsAllocated)), dtype.itemsize * 8)
        _pixel_module(ds, shape, dtype, photometric, bits_stored, frames)
        if "NumberOfFrames" in src and "NumberOfFrames" not in ds:  # Type 1 in multi-frame IODs, also when 1
            ds.NumberOfFrames = frames

        old_type = [str(v) for v in _as_list(src.get("ImageType", []))]
        ds.ImageType = ["DERIVED", "SECONDARY", *old_type[2:]]
        if not _scale_geometry(ds, scale, where) and "FrameOfReferenceUID" in ds:
            from pydicom.uid import generate_uid

            log.warning("%s: the patient position cannot be recomputed (orientation or spacing missing); "
                        "a new FrameOfReferenceUID is written", where)
            ds.FrameOfReferenceUID = generate_uid(
                UID_PREFIX, entropy_srcs=[SOFTWARE, "for", str(src.FrameOfReferenceUID),
                                          *identity(model_id, scale, self.weights_sha256, None, self.provenance)])
        _scale_overlays(src, ds, scale, where)

        stamp_provenance(ds, src, what=f"Super-resolution x{scale}", series_tag=f"SR x{scale}", model_id=model_id,
                         weights_sha256=self.weights_sha256, now=now,
                         sources=[(sop_class, src.get("SOPInstanceUID", ""))], provenance=self.provenance)

        # lossy history: once lossy, always "01" (ratio/method copied with the dataset)
        ts = str(src.file_meta.get("TransferSyntaxUID", "")) if hasattr(src, "file_meta") else ""
        if str(src.get("LossyImageCompression", "")) != "01" and ts in _LOSSY_TS:
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = _LOSSY_TS[ts]
        return ds

    def finish(self, enc: _Encoder) -> Any:
        return _finish_encoded(self.ds, enc)


def _finish_encoded(ds: Any, enc: _Encoder) -> Any:
    """Put the encoded frames into ``ds`` (plus the lossy bookkeeping) and wrap it as a Part 10 FileDataset."""
    from pydicom.dataset import FileDataset

    raw = enc.raw_bytes
    with _quiet("derive_dicom"):
        syntax = enc.finish()
        if syntax.lossy:
            ratio = raw / max(1, len(ds.PixelData))
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = [*[str(v) for v in _as_list(ds.get("LossyImageCompressionRatio"))],
                                             _ds(round(ratio, 2))]
            ds.LossyImageCompressionMethod = [*[str(v) for v in _as_list(ds.get("LossyImageCompressionMethod"))],
                                              "ISO_15444_1"]
            _append_code(ds, "DerivationCodeSequence", _code_item("113040", "DCM", "Lossy Compression"))
        out = FileDataset("", ds, file_meta=ds.file_meta, preamble=b"\0" * 128)
    out._medsr_syntax = syntax  # the syntax actually used (after a fallback), for re-encoding
    return out


def encode_single_frame(ds: Any, pixels: np.ndarray, syntax: str | OutputSyntax | None = None) -> Any:
    """Set the Image Pixel module of ``ds`` (its file meta already set) for one frame of stored ``pixels``
    (BitsStored: ``ds``'s, else the container's; photometric: ``ds``'s) and encode them in ``syntax`` as
    :func:`derive_dicom` does (default JPEG 2000 lossless, RLE lossless for images too small for it; lossy
    bookkeeping). Returns the Part 10 FileDataset. Used by the volume writer (medsr.volumes)."""
    bits = min(int(ds.get("BitsStored", pixels.dtype.itemsize * 8)), pixels.dtype.itemsize * 8)
    with _quiet("derive_dicom"):
        _pixel_module(ds, pixels.shape, pixels.dtype, str(ds.PhotometricInterpretation), bits, 1)
        enc = _Encoder(ds, parse_syntax(syntax))
        enc.add(pixels)
    return _finish_encoded(ds, enc)

def copy_source_header(src: Any) -> Any:
    """A new Dataset with the source's elements except pixel data (and what describes it: icon,
    min/max values), the tags no longer true for a derived instance (_DROP_TAGS), overlays and
    private tags (unknown meaning, may describe the old pixel grid). The source is not modified."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    for elem in src:
        if elem.tag in _PIXEL_TAGS or elem.tag in _DROP_TAGS:
            continue
        if 0x60000000 <= elem.tag <= 0x601EFFFF and elem.tag.group % 2 == 0:
            continue
        ds.add(copy.deepcopy(elem))
    ds.remove_private_tags()  # recursive
    return ds


def stamp_provenance(
    ds: Any, src: Any, *, what: str, series_tag: str, model_id: str, weights_sha256: str | None,
    now: datetime | None, sources: list[tuple[str, str]], provenance: Mapping[str, str] | None = None,
) -> None:
    """Provenance of a derived instance ``ds`` made from ``src`` (extends the source's history, never
    replaces it): DerivationDescription (``what`` + software, model, weights), DerivationCode "Spatial
    resampling", SourceImageSequence (one item per (SOP class, SOP instance) in ``sources``), Contributing
    Equipment, the new content/instance/series date and time, SeriesNumber (+1000) and SeriesDescription
    (``[series_tag]`` appended). Shared by the 2D path and the volume writer (medsr.volumes)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    import medsr

    weights = f"weights sha256 {weights_sha256}" if weights_sha256 else "weights hash unknown"
    desc = f"{what} ({SOFTWARE} {medsr.__version__}, model {model_id}, {weights})"
    old_desc = str(src.get("DerivationDescription", "") or "")
    ds.DerivationDescription = (f"{old_desc}; {desc}" if old_desc else desc)[:1024]
    _append_code(ds, "DerivationCodeSequence", _code_item("113085", "DCM", "Spatial resampling"))
    refs = []
    for sop_class, sop_uid in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop_uid
        ref.PurposeOfReferenceCodeSequence = Sequence(
            [_code_item("121322", "DCM", "Source image for image processing operation")])
        ref.SpatialLocationsPreserved = "NO"
        refs.append(ref)
    ds.SourceImageSequence = Sequence([*(ds.get("SourceImageSequence") or []), *refs])

    local, dt = _stamp(src, now)
    equipment = Dataset()
    equipment.Manufacturer = SOFTWARE
    equipment.ManufacturerModelName = SOFTWARE
    equipment.SoftwareVersions = [f"{SOFTWARE} {medsr.__version__}"[:64], model_id[:64]]
    equipment.ContributionDateTime = dt
    line = f"; {format_provenance(provenance)}" if provenance is not None else ""
    equipment.ContributionDescription = f"{what} by a neural network: model {model_id}, {weights}{line}"[:1024]
    equipment.PurposeOfReferenceCodeSequence = Sequence([_code_item("109103", "DCM", "Modifying Equipment")])
    ds.ContributingEquipmentSequence = Sequence([*(ds.get("ContributingEquipmentSequence") or []), equipment])

    # time and series identity
    date, time = local.strftime("%Y%m%d"), local.strftime("%H%M%S.%f")
    ds.ContentDate = ds.InstanceCreationDate = ds.SeriesDate = date
    ds.ContentTime = ds.InstanceCreationTime = ds.SeriesTime = time
    ds.SeriesNumber = _series_number(src)
    series_desc = str(src.get("SeriesDescription", "") or "").strip() or "Super-resolution"
    tag = f" [{series_tag}]"
    ds.SeriesDescription = (series_desc[: 64 - len(tag)] + tag).strip()


def _append_code(ds: Any, keyword: str, item: Any) -> None:
    from pydicom.sequence import Sequence

    items = list(ds.get(keyword) or [])
    if not any(str(i.get("CodeValue", "")) == item.CodeValue and str(i.get("CodingSchemeDesignator", ""))
               == item.CodingSchemeDesignator for i in items):
        items.append(item)
    setattr(ds, keyword, Sequence(items))


def _series_number(src: Any) -> int:
    """Documented rule: source SeriesNumber + 1000 (1000 when the source has none or an invalid one)."""
    try:
        n = int(str(src.get("SeriesNumber", "")).strip())
    except ValueError:
        return SERIES_NUMBER_OFFSET
    return n + SERIES_NUMBER_OFFSET if 0 <= n <= 2**31 - 1 - SERIES_NUMBER_OFFSET else SERIES_NUMBER_OFFSET


def reencode(ds: Any, pixels: np.ndarray, syntax: str | OutputSyntax | None = None) -> None:
    """Replace the pixel data of a derived single-frame ``ds`` by ``pixels`` (clipped to BitsStored),
    in ``syntax`` (default: the one it was derived with, else the one its transfer syntax names)."""
    syn = syntax if isinstance(syntax, OutputSyntax) else None
    if syn is None and syntax is not None:
        syn = parse_syntax(syntax)
    if syn is None:
        syn = getattr(ds, "_medsr_syntax", None)
    if syn is None:
        uid = str(ds.file_meta.TransferSyntaxUID)
        names = {v: k for k, v in SYNTAX_NAMES.items()}
        syn = parse_syntax(names.get(uid, "explicit-le"))
    bits = int(ds.get("BitsStored", pixels.dtype.itemsize * 8))
    signed = pixels.dtype.kind == "i"
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    _pixel_module(ds, pixels.shape, pixels.dtype, str(ds.PhotometricInterpretation), bits, 1)
    enc = _Encoder(ds, replace(syn, chosen=True))
    enc.add(np.clip(pixels, lo, hi).astype(pixels.dtype, copy=False))
    enc.finish()


def pixels_digest(pixels: np.ndarray) -> str:
    """A digest of an output's pixels, so that a writer can tell whether they changed since encoding."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((pixels.shape, pixels.dtype.str)).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()


__all__ = [
    "DEFAULT_SYNTAX",
    "IMPLEMENTATION_CLASS_UID",
    "SYNTAX_NAMES",
    "OutputSyntax",
    "copy_source_header",
    "derive_dicom",
    "derive_frames",
    "derived_uids",
    "encode_single_frame",
    "finish_pixels",
    "identity",
    "parse_syntax",
    "pixels_digest",
    "reencode",
    "stamp_provenance",
    "write_dicom",
]


# ----------------------------------------------------------------------------------------- write


def write_dicom(img: Image, tmp: Path) -> None:
    """Write the derived dataset of ``img`` as a Part 10 file in its transfer syntax. A single-frame
    Image whose pixels changed since the dataset was derived is re-encoded from ``img.pixels``
    (same syntax), so that the file always holds what the Image holds."""
    ds = img.dataset
    if ds is None:
        raise ImageWriteError("DICOM output needs img.dataset (use make_output/derive_dicom)")
    if "PixelData" not in ds or ds.file_meta.get("TransferSyntaxUID") is None:
        raise ImageWriteError("DICOM dataset has no pixel data or transfer syntax")
    expected = (int(ds.Rows), int(ds.Columns))
    if img.pixels.shape[:2] != expected:
        raise ImageWriteError(
            f"pixels {img.pixels.shape[:2]} do not match the dataset's Rows/Columns {expected}"
        )
    if img.frames == 1:
        if img.meta.get("dicom_pixels_digest") != pixels_digest(img.pixels):
            with _quiet(tmp):
                reencode(ds, img.pixels, img.meta.get("dicom_syntax"))
    with _quiet(tmp):
        ds.save_as(tmp, enforce_file_format=True)
