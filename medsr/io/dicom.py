"""DICOM reading (pydicom; compressed transfer syntaxes via the pylibjpeg plugins); the writing of derived
instances is :mod:`medsr.io.dicom_derive` (which imports this module, never the other way round).

Policy (see docs/io.md): the model works on *stored* values (Rescale, windowing and LUTs are kept
unchanged, they still apply); the output is a new derived instance built by
:mod:`medsr.io.dicom_derive` (UIDs from the source UIDs, the weights' sha256 and the scale;
JPEG 2000 lossless by default). Multi-frame images are decoded one frame at a time
(:func:`iter_frames`). Patient/study attributes are copied, never logged or put into messages.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medsr.io.base import Image, ImageReadError

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
        try:
            return _read_dicom(path)
        except ImageReadError:
            raise
        except Exception as e:  # a damaged attribute pydicom cannot convert; its value stays out of the message
            raise ImageReadError(f"{path}: corrupt DICOM file (an attribute cannot be read: {type(e).__name__})") from None


def _read_dicom(path: Path) -> Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    not_dicom = f"{path}: not a DICOM file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(132)
    if size < 132 and not head[:128].strip(b"\x00") and b"DICM".startswith(head[128:]):  # a preamble, no more
        not_dicom = f"{path}: truncated DICOM file ({size} bytes: the file ends inside the 128-byte preamble)"
    elif head[128:132] == b"DICM":  # it says it is DICOM: what follows is damaged
        not_dicom = f"{path}: truncated or corrupt DICOM file (a DICM marker, then no readable file meta or data set)"
    try:
        ds = pydicom.dcmread(path, force=True)
    except InvalidDicomError:
        raise ImageReadError(not_dicom) from None
    except Exception as e:  # truncated/corrupt; message names only the parser problem
        raise ImageReadError(f"{path}: corrupt or truncated DICOM file ({type(e).__name__})") from None
    try:
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            if len(ds) == 0 or ("SOPClassUID" not in ds and "PixelData" not in ds):
                raise ImageReadError(not_dicom)
    except ImageReadError:
        raise
    except Exception:  # forced read of non-DICOM bytes
        raise ImageReadError(not_dicom) from None
    from medsr.io.checks import check_dicom_lengths

    deflated = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99"
    check_dicom_lengths(path, ds, None if deflated else size)  # declared lengths against the bytes present
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
        sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
        image_like = "Rows" in ds or "Columns" in ds or "Image Storage" in getattr(sop, "name", "")
        if path is not None and image_like:  # a file cut before its pixel data still parses
            raise ImageReadError(
                f"{where}: truncated or corrupt DICOM file: an image (SOP class, Rows/Columns) with no pixel data"
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
    from medsr.io.checks import check_dicom_geometry, check_encapsulated

    check_dicom_geometry(where, ds)
    if frames < 1:
        raise ImageReadError(f"{where}: invalid NumberOfFrames {frames}")
    if bits_alloc not in (8, 16) or not 1 <= bits_stored <= bits_alloc:
        raise ImageReadError(
            f"{where}: unsupported DICOM bit depth (BitsAllocated {bits_alloc}, BitsStored {bits_stored}); "
            "need 8 or 16 bits allocated"
        )
    colour = photometric == "RGB" or photometric.startswith("YBR")
    if (samples == 3 and photometric.startswith("MONOCHROME")) or (samples == 1 and colour):
        raise ImageReadError(
            f"{where}: inconsistent DICOM: SamplesPerPixel {samples} with PhotometricInterpretation {photometric}"
        )
    if samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{where}: unsupported DICOM photometric interpretation {photometric}")
    if samples == 3 and not colour:
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
                f"{where}: inconsistent DICOM: pixel data is {got} bytes, expected {expected} for "
                f"{ds.Rows}x{ds.Columns}x{samples} at {bits_alloc} bits: Rows/Columns/SamplesPerPixel/BitsAllocated/"
                f"NumberOfFrames ({frames}) do not match the data"
            )
    elif raw is not None and tsuid:  # encapsulated: fragments against NumberOfFrames, before any codec sees them
        if path is not None and not getattr(ds["PixelData"], "is_undefined_length", True):  # as read from a file
            raise ImageReadError(
                f"{where}: corrupt DICOM file: {ts_name} pixel data must be encapsulated (undefined length), this has "
                "a defined length: the data is not in that transfer syntax, or the file is corrupt"
            )
        check_encapsulated(where, raw, tsuid, frames, "NumberOfFrames" in ds)
    arr = _decode_frame(ds, 0 if frames > 1 else None, where, ts_name)
    _check_decoded(arr, ds, where, samples, 0 if frames > 1 else None)
    arr = _to_stored(arr, where, bits_alloc, bits_stored, pixel_rep)
    meta: dict[str, Any] = {
        "bits_stored": bits_stored,
        "bits_allocated": arr.dtype.itemsize * 8,
        "signed": bool(pixel_rep),
        "transfer_syntax": str(tsyntax) if tsyntax else None,
        "transfer_syntax_name": ts_name,
        "source_photometric": photometric,
        "rescale": (_number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)),
    }
    if frames > 1:
        meta["frames"] = frames  # Image.pixels holds frame 0; iter_frames() decodes them one by one
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


def _decode_frame(ds: Any, index: int | None, where: object, ts_name: str) -> np.ndarray:
    """One frame (``index``) or the whole single-frame image (``None``); YBR is converted to RGB."""
    try:
        if index is None:
            return ds.pixel_array
        from pydicom.pixels import pixel_array

        return pixel_array(ds, index=index)
    except Exception as e:  # missing plugin, corrupt codestream, short pixel data
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        frame = f" frame {index + 1}" if index is not None else ""
        raise ImageReadError(
            f"{where}: cannot decode DICOM pixel data{frame} ({ts_name}): corrupt, truncated or not in that transfer "
            f"syntax ({type(e).__name__}{': ' + detail if detail else ''})"
        ) from None


def _check_decoded(arr: np.ndarray, ds: Any, where: object, samples: int, index: int | None) -> None:
    """A decoded frame has the shape Rows/Columns/SamplesPerPixel declare (a codestream may say otherwise)."""
    want = (int(ds.Rows), int(ds.Columns)) + ((samples,) if samples > 1 else ())
    if tuple(arr.shape) != want:
        frame = f" frame {index + 1}" if index is not None else ""
        raise ImageReadError(
            f"{where}: inconsistent DICOM: the pixel data{frame} decodes to {tuple(arr.shape)}, Rows/Columns/"
            f"SamplesPerPixel/NumberOfFrames declare {want}: corrupt header or codestream"
        )


def _to_stored(arr: np.ndarray, where: object, bits_alloc: int, bits_stored: int, pixel_rep: int) -> np.ndarray:
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
    return arr


def iter_frames(img: Image) -> Iterator[np.ndarray]:
    """The stored frames of a DICOM ``img`` one at a time (decoded on demand: bounded memory), with
    the same conversions as :func:`read_dicom`. A single-frame image yields its pixels."""
    n = img.frames
    if n == 1 or img.dataset is None:
        yield img.pixels
        return
    ds = img.dataset
    where = img.path if img.path is not None else "<dataset>"
    bits_alloc, bits_stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
    pixel_rep = int(ds.get("PixelRepresentation", 0))
    ts_name = str(img.meta.get("transfer_syntax_name", ""))
    for i in range(n):
        with _quiet(where):
            if i == 0:
                yield img.pixels
                continue
            arr = _decode_frame(ds, i, where, ts_name)
            _check_decoded(arr, ds, where, int(ds.SamplesPerPixel), i)
            yield _to_stored(arr, where, bits_alloc, bits_stored, pixel_rep)


def _number(ds: Any, keyword: str, default: float) -> float:
    try:
        value = ds.get(keyword, None)
        return default if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return default


# -------------------------------------------------------------------- helpers shared with dicom_derive


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]
