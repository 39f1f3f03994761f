"""DICOM reading (pydicom; compressed transfer syntaxes via the pylibjpeg plugins) and the derived
output dataset.

Policy (see docs/io.md): the model works on *stored* values (Rescale, windowing and LUTs are kept
unchanged, they still apply); the output is a new instance in a new series whose UIDs are derived
deterministically from the source UIDs and the model id; it is written uncompressed (Explicit VR
Little Endian). Patient/study attributes are copied, never logged or put into messages.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from medsr.io.image import Image, ImageReadError, ImageWriteError

log = logging.getLogger("medsr.io")

#: root for derived UIDs: pydicom's, with a SHA-512 of (source UID, model id, scale, role) appended
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
SOFTWARE = "medsr"

_PIXEL_TAGS = {
    0x7FE00010,  # PixelData
    0x7FE00008,  # FloatPixelData
    0x7FE00009,  # DoubleFloatPixelData
    0x7FE00001,  # ExtendedOffsetTable
    0x7FE00002,  # ExtendedOffsetTableLengths
    0x00280106,  # SmallestImagePixelValue
    0x00280107,  # LargestImagePixelValue
    0x00280108,  # SmallestPixelValueInSeries
    0x00280109,  # LargestPixelValueInSeries
    0x00880200,  # IconImageSequence: source thumbnail, encapsulated when the source was compressed
}

# transfer syntaxes that are always lossy (J2K .91 may be either: trust LossyImageCompression)
_LOSSY_TS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
}


def _code_item(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


# ------------------------------------------------------------------------------------------ read


@contextlib.contextmanager
def _quiet(where: object) -> Iterator[None]:
    """pydicom warnings can quote attribute values (e.g. an invalid PatientBirthDate): swallow them
    and log only how many there were and their categories."""
    pydicom_log = logging.getLogger("pydicom")
    dropped: list[str] = []

    def _drop(record: logging.LogRecord) -> bool:
        dropped.append(record.levelname)
        return False

    pydicom_log.addFilter(_drop)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        pydicom_log.removeFilter(_drop)
    if caught or dropped:
        kinds = sorted({w.category.__name__ for w in caught})
        log.debug(
            "%s: %d DICOM warning(s), %d pydicom log record(s) suppressed (%s; messages not shown)",
            where,
            len(caught),
            len(dropped),
            ", ".join(kinds),
        )


def read_dicom(path: Path) -> Image:
    """Read a single-frame DICOM image (see :func:`_read_dicom`)."""
    with _quiet(path):
        return _read_dicom(path)


def _read_dicom(path: Path) -> Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=True)
    except InvalidDicomError:
        raise ImageReadError(f"{path}: not a DICOM file") from None
    except Exception as e:  # truncated/corrupt; message names only the parser problem
        raise ImageReadError(f"{path}: corrupt DICOM file ({type(e).__name__})") from None
    try:
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            if len(ds) == 0 or ("SOPClassUID" not in ds and "PixelData" not in ds):
                raise ImageReadError(f"{path}: not a DICOM file")
    except ImageReadError:
        raise
    except Exception:  # forced read of non-DICOM bytes
        raise ImageReadError(f"{path}: not a DICOM file") from None
    return _image_from_dataset(ds, path)


def _has_pixel_tag(path: Path) -> bool:
    """True if the raw file contains the (7FE0,0010) Pixel Data tag (little or big endian)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def image_from_dataset(ds: Any, path: Path | None = None) -> Image:
    """An :class:`Image` from an in-memory pydicom Dataset (same checks as :func:`read_dicom`;
    messages name ``path`` or ``<dataset>``). The dataset is kept as ``Image.dataset``."""
    with _quiet(path or "<dataset>"):
        return _image_from_dataset(ds, path)


def _image_from_dataset(ds: Any, path: Path | None) -> Image:
    where = path if path is not None else "<dataset>"
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise ImageReadError(f"{where}: DICOM float pixel data is not supported")
    if "PixelData" not in ds:
        if path is not None and _has_pixel_tag(path):
            raise ImageReadError(
                f"{where}: the file holds a pixel data element that cannot be read: it is truncated or corrupt "
                "(e.g. an element runs past the end of the file)"
            )
        raise ImageReadError(
            f"{where}: DICOM file has no pixel data (not an image: e.g. a report or structure)"
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.SamplesPerPixel)
        bits_alloc = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_alloc))
        pixel_rep = int(ds.get("PixelRepresentation", 0))
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        int(ds.Rows), int(ds.Columns)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ImageReadError(
            f"{where}: DICOM image pixel module incomplete or invalid ({type(e).__name__})"
        ) from None
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_name = getattr(tsyntax, "name", str(tsyntax))
    if frames != 1:
        raise ImageReadError(f"{where}: multi-frame DICOM ({frames} frames) is not supported")
    if bits_alloc not in (8, 16) or not 1 <= bits_stored <= bits_alloc:
        raise ImageReadError(
            f"{where}: unsupported DICOM bit depth (BitsAllocated {bits_alloc}, BitsStored {bits_stored}); "
            "need 8 or 16 bits allocated"
        )
    if samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{where}: unsupported DICOM photometric interpretation {photometric}")
    if samples == 3 and not (photometric == "RGB" or photometric.startswith("YBR")):
        raise ImageReadError(f"{where}: unsupported DICOM photometric interpretation {photometric}")
    if samples not in (1, 3):
        raise ImageReadError(f"{where}: unsupported DICOM SamplesPerPixel {samples}")
    if samples == 3 and pixel_rep:
        raise ImageReadError(f"{where}: signed colour DICOM is not supported")
    tsuid = str(tsyntax) if tsyntax else ""
    raw = ds.get("PixelData")
    native = tsuid in ("", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")
    if native and raw is not None:
        if getattr(ds["PixelData"], "is_undefined_length", False) or isinstance(raw, (list, tuple)):
            raise ImageReadError(
                f"{where}: native ({ts_name}) pixel data has undefined length (encapsulated): the transfer syntax "
                "does not match the pixel data, or the file is corrupt"
            )
        expected = int(ds.Rows) * int(ds.Columns) * samples * frames * bits_alloc // 8
        got = len(raw) if isinstance(raw, (bytes, bytearray)) else expected
        if got < expected:
            raise ImageReadError(
                f"{where}: pixel data is truncated: {got} bytes, expected {expected} for "
                f"{ds.Rows}x{ds.Columns}x{samples} at {bits_alloc} bits"
            )
        if got > expected + 1:  # one pad byte is legal
            raise ImageReadError(
                f"{where}: pixel data is {got} bytes, expected {expected} for {ds.Rows}x{ds.Columns}x{samples} at "
                f"{bits_alloc} bits: Rows/Columns/SamplesPerPixel/BitsAllocated do not match the data"
            )
    try:
        arr = ds.pixel_array  # YBR is converted to RGB by pydicom
    except Exception as e:  # missing plugin, corrupt codestream, short pixel data
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise ImageReadError(
            f"{where}: cannot decode DICOM pixel data ({ts_name}): corrupt, truncated or not in that transfer "
            f"syntax ({type(e).__name__}{': ' + detail if detail else ''})"
        ) from None
    want = np.int16 if pixel_rep else np.uint16
    if bits_alloc == 8:
        want = np.int8 if pixel_rep else np.uint8
    if pixel_rep and bits_alloc == 8:
        # int8 is not a supported container downstream: widen to int16, BitsAllocated becomes 16
        want = np.int16
    arr = np.ascontiguousarray(arr.astype(want, copy=False))
    if pixel_rep:
        lo, hi = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        lo, hi = 0, 2**bits_stored - 1
    amin, amax = int(arr.min()), int(arr.max())
    if amin < lo or amax > hi:  # values outside BitsStored (bad encoder): clip, say so (no values)
        log.warning("%s: pixel values exceed BitsStored %d; clipped", where, bits_stored)
        np.clip(arr, lo, hi, out=arr)
    meta: dict[str, Any] = {
        "bits_stored": bits_stored,
        "bits_allocated": arr.dtype.itemsize * 8,
        "signed": bool(pixel_rep),
        "transfer_syntax": str(tsyntax) if tsyntax else None,
        "transfer_syntax_name": ts_name,
        "source_photometric": photometric,
        "rescale": (_number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)),
    }
    img = Image(
        pixels=arr,
        format="dicom",
        max_value=2**bits_stored - 1,
        photometric="RGB" if samples == 3 else photometric,
        path=path,
        dataset=ds,
        meta=meta,
    )
    log.debug("%s: DICOM %s, BitsStored %d, %s", where, ts_name, bits_stored, img.photometric)
    return img


def _number(ds: Any, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword, None)
        return default if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------------------------------- derive


def derived_uids(src_ds: Any, model_id: str, scale: int) -> tuple[str, str]:
    """(SOPInstanceUID, SeriesInstanceUID) for the output: deterministic in (source UIDs, model id,
    scale), different from the source's. Source without UIDs: the pixel data hash stands in."""
    from pydicom.uid import generate_uid

    sop = str(src_ds.get("SOPInstanceUID", "") or "")
    series = str(src_ds.get("SeriesInstanceUID", "") or "")
    if not sop:
        data = src_ds.get("PixelData", b"") or b""
        sop = "sha256:" + hashlib.sha256(data).hexdigest()
    if not series:
        series = "series-of:" + sop
    new_sop = generate_uid(UID_PREFIX, entropy_srcs=[SOFTWARE, "sop", sop, model_id, str(scale)])
    new_series = generate_uid(UID_PREFIX, entropy_srcs=[SOFTWARE, "series", series, model_id, str(scale)])
    return str(new_sop), str(new_series)


def _ds_list(value: Any) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (str, bytes, int, float)) or not hasattr(value, "__iter__"):
        return [float(value)]
    return [float(v) for v in value]


def _scale_spacing(ds: Any, keyword: str, scale: int) -> None:
    from pydicom.valuerep import format_number_as_ds

    if keyword in ds and ds[keyword].value not in (None, "", []):
        values = _ds_list(ds[keyword].value)
        ds[keyword].value = [format_number_as_ds(v / scale) for v in values]


def _scale_shutters(ds: Any, scale: int) -> None:
    """Display shutter coordinates are in pixels (1-based): map them to the upscaled grid."""

    def edge(kw: str, first: bool) -> None:
        if kw in ds and ds[kw].value not in (None, ""):
            v = int(ds[kw].value)
            ds[kw].value = (v - 1) * scale + 1 if first else v * scale

    edge("ShutterLeftVerticalEdge", True)
    edge("ShutterRightVerticalEdge", False)
    edge("ShutterUpperHorizontalEdge", True)
    edge("ShutterLowerHorizontalEdge", False)
    for kw in ("CenterOfCircularShutter", "VerticesOfThePolygonalShutter"):
        if kw in ds and ds[kw].value not in (None, ""):
            ds[kw].value = [int(round((float(v) - 0.5) * scale + 0.5)) for v in _ds_list(ds[kw].value)]
    if "RadiusOfCircularShutter" in ds and ds.RadiusOfCircularShutter not in (None, ""):
        ds.RadiusOfCircularShutter = int(ds.RadiusOfCircularShutter) * scale


def derive_dicom(
    src_ds: Any, pixels: np.ndarray, scale: int, model_id: str, *, now: datetime | None = None
) -> Any:
    """The derived (super-resolved) dataset for ``pixels`` (stored values, ``scale`` x the source
    size, same dtype/BitsStored/photometric as the source as returned by :func:`read_dicom`).

    See docs/io.md for the attributes set. The source dataset is not modified. ``now`` (default:
    the current local time) sets Content/Instance Creation Date and Time.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, not {scale}")
    rows, cols = int(src_ds.Rows), int(src_ds.Columns)
    if pixels.shape[:2] != (rows * scale, cols * scale):
        raise ValueError(
            f"pixels are {pixels.shape[:2]}, expected {(rows * scale, cols * scale)} for x{scale}"
        )

    src_photometric = str(src_ds.PhotometricInterpretation).strip().upper()
    photometric = "RGB" if int(src_ds.SamplesPerPixel) == 3 else src_photometric
    bits_stored = int(src_ds.get("BitsStored", src_ds.BitsAllocated))
    signed = bool(int(src_ds.get("PixelRepresentation", 0)))
    if pixels.dtype.kind not in "ui" or pixels.dtype.itemsize not in (1, 2):
        raise ValueError(f"pixels must be uint8/uint16/int16, not {pixels.dtype}")
    if signed != (pixels.dtype.kind == "i"):
        raise ValueError(f"pixels dtype {pixels.dtype} does not match PixelRepresentation {int(signed)}")
    bits_stored = min(bits_stored, pixels.dtype.itemsize * 8)
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    pixels = np.clip(pixels, lo, hi).astype(pixels.dtype, copy=False)

    with _quiet("derive_dicom"):
        return _derive(src_ds, pixels, scale, model_id, photometric, src_photometric, bits_stored, now)


def _derive(
    src_ds: Any,
    pixels: np.ndarray,
    scale: int,
    model_id: str,
    photometric: str,
    src_photometric: str,
    bits_stored: int,
    now: datetime | None,
) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    ds = Dataset()
    for elem in src_ds:
        if elem.tag in _PIXEL_TAGS:
            continue
        if 0x60000000 <= elem.tag <= 0x601EFFFF and elem.tag.group % 2 == 0:
            continue  # overlay planes are in source pixel units: dropped (docs/io.md)
        ds.add(copy.deepcopy(elem))

    new_sop, new_series = derived_uids(src_ds, model_id, scale)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = src_ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = new_sop
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = new_sop
    ds.SeriesInstanceUID = new_series

    # pixel module: Rows/Columns, BitsAllocated/Stored/HighBit, PixelRepresentation, PixelData
    ds.set_pixel_data(np.ascontiguousarray(pixels), photometric, bits_stored, generate_instance_uid=False)
    if photometric != src_photometric:
        log.debug("derived DICOM: %s source written as %s", src_photometric, photometric)

    old_type = [str(v) for v in _as_list(src_ds.get("ImageType", []))]
    ds.ImageType = ["DERIVED", "SECONDARY", *old_type[2:]]
    for kw in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        _scale_spacing(ds, kw, scale)
    _scale_shutters(ds, scale)

    desc = f"Super-resolution x{scale} ({SOFTWARE}, model {model_id}): spatial resampling by a neural network"
    old_desc = str(src_ds.get("DerivationDescription", "") or "")
    ds.DerivationDescription = (f"{old_desc}; {desc}" if old_desc else desc)[:1024]
    ds.DerivationCodeSequence = Sequence([_code_item("113085", "DCM", "Spatial resampling")])

    ref = Dataset()
    ref.ReferencedSOPClassUID = src_ds.get("SOPClassUID", ds.SOPClassUID)
    ref.ReferencedSOPInstanceUID = src_ds.get("SOPInstanceUID", "")
    ref.PurposeOfReferenceCodeSequence = Sequence(
        [_code_item("121322", "DCM", "Source image for image processing operation")]
    )
    ref.SpatialLocationsPreserved = "NO"
    ds.SourceImageSequence = Sequence([ref])

    stamp = now or datetime.now()
    ds.ContentDate = ds.InstanceCreationDate = stamp.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = stamp.strftime("%H%M%S.%f")

    series_desc = str(src_ds.get("SeriesDescription", "") or "")
    tag = f" [SR x{scale}]"
    ds.SeriesDescription = (series_desc[: 64 - len(tag)] + tag).strip()

    # lossy history: once lossy, always "01" (ratio/method copied with the dataset)
    ts = str(src_ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(src_ds, "file_meta") else ""
    if str(src_ds.get("LossyImageCompression", "")) != "01" and ts in _LOSSY_TS:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = _LOSSY_TS[ts]
    return ds


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


# ----------------------------------------------------------------------------------------- write


def write_dicom(img: Image, tmp: Path) -> None:
    """Write the (derived) dataset of ``img`` uncompressed (Explicit VR Little Endian)."""
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
    lo, hi = img.value_range
    pixels = np.clip(img.pixels, lo, hi).astype(img.pixels.dtype, copy=False)
    ds.set_pixel_data(  # refresh from img.pixels so that the file always holds what the Image holds
        np.ascontiguousarray(pixels),
        str(ds.PhotometricInterpretation),
        img.bits_stored,
        generate_instance_uid=False,
    )
    with _quiet(tmp):
        ds.save_as(tmp, enforce_file_format=True)
