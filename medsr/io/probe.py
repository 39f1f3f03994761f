"""Image dimensions from the file header, before any pixel is decoded (decompression-bomb guard).

A small PNG, TIFF, JPEG or deflated DICOM can claim (and decode to) 20000 x 20000 pixels. Every
reader in ``medsr.io`` first asks :func:`header_size` for the dimensions and refuses images above
the pixel limit (``DEFAULT_MAX_PIXELS``, ``--max-pixels``), so memory is never spent on them.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from medsr.io.base import ImageReadError

#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT/JPG/DAC
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
DEFLATED = "1.2.840.10008.1.2.1.99"


def header_size(path: Path, fmt: str) -> tuple[int, int, int]:
    """(height, width, frames) from the header of a ``fmt`` file; raises ImageReadError if unreadable."""
    if fmt == "png":
        with open(path, "rb") as f:
            head = f.read(24)
        if len(head) < 24:
            raise ImageReadError(f"{path}: truncated PNG file ({len(head)} bytes, the header alone needs 24)")
        if head[12:16] != b"IHDR":
            raise ImageReadError(f"{path}: corrupt PNG file (missing IHDR header)")
        w, h = struct.unpack(">II", head[16:24])
        return h, w, 1
    if fmt == "jpeg":
        return _jpeg_size(path)
    if fmt == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
                h, w = int(page.imagelength), int(page.imagewidth)
        except Exception as e:  # tifffile raises many types for corrupt headers
            raise ImageReadError(f"{path}: corrupt or truncated TIFF file ({type(e).__name__}: {e})") from None
        return h, w, 1
    if fmt == "dicom":
        return _dicom_size(path)
    raise ValueError(f"unknown format {fmt!r}")


def _jpeg_size(path: Path) -> tuple[int, int, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            raise ImageReadError(f"{path}: not a valid JPEG file (no start-of-image marker)")
        while True:
            b = f.read(1)
            while b and b != b"\xff":  # skip to the next marker
                b = f.read(1)
            while b == b"\xff":  # fill bytes
                b = f.read(1)
            if not b:
                raise ImageReadError(f"{path}: truncated JPEG file (no frame header)")
            marker = b[0]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                continue
            seg = f.read(2)
            if len(seg) < 2:
                raise ImageReadError(f"{path}: truncated JPEG file (no frame header)")
            n = struct.unpack(">H", seg)[0]
            at = f.tell() - 4
            if at + 2 + n > size:
                raise ImageReadError(
                    f"{path}: truncated JPEG file (segment 0xFF{marker:02X} at offset {at} declares {n} bytes, "
                    f"only {max(0, size - at - 2)} present)"
                )
            if marker in _SOF:
                data = f.read(5)
                if len(data) < 5:
                    raise ImageReadError(f"{path}: truncated JPEG file (short frame header)")
                h, w = struct.unpack(">HH", data[1:5])
                return h, w, 1
            if n < 2:
                raise ImageReadError(f"{path}: corrupt JPEG file (bad segment length)")
            f.seek(n - 2, 1)


DEFLATED_TS = "1.2.840.10008.1.2.1.99"


def dicom_deflated(path: str | Path) -> bool:
    """True when the file meta names Deflated Explicit VR Little Endian. Reading such a data set inflates the whole
    stream (a few KiB can inflate to gigabytes), so header probes (model choice, volume detection) leave it to
    the full reader, which inflates in bounded steps against the pixel limit."""
    try:
        from pydicom.filereader import read_file_meta_info

        return str(read_file_meta_info(path).get("TransferSyntaxUID", "")) == DEFLATED_TS
    except Exception:
        return False


def _dicom_size(path: Path) -> tuple[int, int, int]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=None)
    except Exception as e:  # the full reader reports the details
        raise ImageReadError(f"{path}: corrupt DICOM file ({type(e).__name__})") from None
    rows, cols = ds.get("Rows"), ds.get("Columns")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if rows is None or cols is None:
        return 0, 0, 0  # not an image: the full reader names the problem
    return int(rows), int(cols), max(1, frames)


def dicom_is_deflated(path: Path) -> bool:
    import pydicom

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return False
    return str(meta.get("TransferSyntaxUID", "")) == DEFLATED


def check_deflate_size(path: Path, limit_bytes: int) -> None:
    """Inflate a deflated DICOM body in 1 MB steps and refuse it once it passes ``limit_bytes``."""
    with open(path, "rb") as f:
        f.seek(132 + _meta_length(path))
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := f.read(1 << 20):
            try:  # at most 4 MB of output per call: the inflated data is counted, never held
                total += len(d.decompress(chunk, min(4 << 20, limit_bytes + 1 - total)))
                while d.unconsumed_tail and total <= limit_bytes:
                    total += len(d.decompress(d.unconsumed_tail, min(4 << 20, limit_bytes + 1 - total)))
            except zlib.error as e:
                raise ImageReadError(f"{path}: corrupt deflated DICOM data ({e})") from None
            if total > limit_bytes:
                raise ImageReadError(
                    f"{path}: deflated DICOM inflates to more than {limit_bytes / 1e6:.0f} MB, "
                    "more than the pixel limit allows; refusing to decode it"
                )
        if not d.eof:
            raise ImageReadError(f"{path}: truncated deflated DICOM file (the deflate stream ends before its end marker)")


def _meta_length(path: Path) -> int:
    """Bytes of the file meta group after the preamble (group length element + its value)."""
    with open(path, "rb") as f:
        f.seek(132)
        head = f.read(12)
    # (0002,0000) UL 4 value: explicit VR little endian
    if head[:4] != b"\x02\x00\x00\x00":
        raise ImageReadError(f"{path}: DICOM file meta has no group length")
    (length,) = struct.unpack("<I", head[8:12])
    return 12 + length


def header_kind(path: str | Path) -> dict[str, object]:
    """What an input is, from its header only (no pixel decoded): ``format``, ``channels`` (samples per
    pixel: 1 gray, 3 colour; 0 when unknown) and, for DICOM, ``modality`` and ``sop_class_uid``.

    For model choice (``medsr.runtime.choice``). Never raises for unreadable files: what cannot be read
    stays unknown, and the reader reports the problem when the file is upscaled.
    """
    from medsr.io.base import sniff_format

    p = Path(path)
    out: dict[str, object] = {"format": None, "channels": 0, "modality": "", "sop_class_uid": ""}
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError:
        return out
    fmt = sniff_format(head)
    if fmt is None and p.suffix.lower() in ("", ".dcm", ".dicom"):
        fmt = "dicom"
    out["format"] = fmt
    try:
        if fmt == "png" and len(head) >= 26 and head[12:16] == b"IHDR":
            # colour type: 0 gray, 2 RGB, 3 palette, 4 gray + alpha, 6 RGBA
            out["channels"] = 1 if head[25] in (0, 4) else 3
        elif fmt == "jpeg":
            out["channels"] = _jpeg_components(p)
        elif fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(p) as tf:
                page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
                spp = int(page.samplesperpixel)
                out["channels"] = 1 if spp in (1, 2) else 3
        elif fmt == "dicom" and not dicom_deflated(p):
            import pydicom

            ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
            out["channels"] = int(ds.get("SamplesPerPixel", 1) or 1)
            out["modality"] = str(ds.get("Modality", "") or "").strip().upper()
            sop = ds.get("SOPClassUID", None)
            if sop is None and getattr(ds, "file_meta", None) is not None:
                sop = ds.file_meta.get("MediaStorageSOPClassUID", None)
            out["sop_class_uid"] = str(sop or "").strip()
    except Exception:  # header unreadable: leave it unknown, the reader will say why
        pass
    return out


def _jpeg_components(path: Path) -> int:
    """Number of colour components in a JPEG's frame header (1 gray, 3 colour)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return 0
        while True:
            b = f.read(1)
            while b and b != b"\xff":
                b = f.read(1)
            while b == b"\xff":
                b = f.read(1)
            if not b:
                return 0
            marker = b[0]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                continue
            seg = f.read(2)
            if len(seg) < 2:
                return 0
            n = struct.unpack(">H", seg)[0]
            if marker in _SOF:
                data = f.read(6)
                return int(data[5]) if len(data) == 6 else 0
            if n < 2:
                return 0
            f.seek(n - 2, 1)
