"""Structural checks run before any pixel is decoded: declared lengths against the bytes present, and
the geometry fields against each other.

Decoders are lenient: libpng, libjpeg, tifffile and pydicom fill a short strip with zeros, read a
4 GB length field as "whatever is left", or decode two concatenated frames as one image of nonsense
shape. Each reader in :mod:`medsr.io` therefore checks its format's container first:

* PNG: every chunk's length against the file, every chunk's CRC, IHDR's fields, IEND present;
* JPEG: every marker segment's length against the file, the frame header's fields, the scan data
  ending in a marker (restart markers in sequence), the end-of-image marker present;
* TIFF: ImageWidth/ImageLength/SamplesPerPixel/BitsPerSample, the number of strips or tiles, each
  StripByteCounts/TileByteCounts non-zero and inside the file, uncompressed strips long enough;
* DICOM: the Pixel Data length field against the file, the encapsulated fragments (item lengths, the
  sequence delimiter, the offset table) against NumberOfFrames, and Rows/Columns/BitsAllocated/
  BitsStored/HighBit/SamplesPerPixel/NumberOfFrames against each other.

Failures raise :class:`~medsr.io.image.ImageReadError` whose message names the file, says
"truncated" or "corrupt" (or the inconsistent field) and where (chunk, segment, strip, offset).

What no check can see, and is accepted: a changed bit inside uncompressed pixel data (TIFF, native
DICOM), inside JPEG entropy-coded data or table values, or inside a DICOM attribute value that is
not a pixel-module field: these formats carry no checksum there, the file is still well formed
and decodes to an image of the declared size. PNG is fully covered by its chunk CRCs.

Known gap: a JPEG frame header whose height or width was changed decodes to that other size; libjpeg
fills the missing rows and only prints "premature end of data segment" on stderr, which OpenCV does
not report (tests/test_hostile_sweep.py keeps it as a strict xfail).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

from medsr.io.base import ImageReadError

# ------------------------------------------------------------------------------------------------ PNG

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
#: allowed bit depths per colour type (PNG spec, table 11.1)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def check_png(path: Path, data: bytes) -> None:
    """Walk the chunks of a PNG file: lengths inside the file, CRCs, IHDR first and valid, IDAT, IEND."""
    n = len(data)
    if data[:8] != _PNG_SIG:
        raise ImageReadError(f"{path}: corrupt PNG file (bad signature)")
    pos, first, idat = 8, True, 0
    view = memoryview(data)
    while True:
        if pos >= n:
            raise ImageReadError(f"{path}: truncated PNG file (ends at byte {n} without an IEND chunk)")
        if pos + 8 > n:
            raise ImageReadError(f"{path}: truncated PNG file (chunk header at offset {pos} cut off at byte {n})")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        name = ctype.decode("latin-1")
        if not ctype.isalpha():
            raise ImageReadError(f"{path}: corrupt PNG file (invalid chunk type {name!r} at offset {pos})")
        if length > 0x7FFFFFFF:
            raise ImageReadError(f"{path}: corrupt PNG file (chunk {name} at offset {pos}: length {length} over 2^31-1)")
        end = pos + 12 + length
        if end > n:
            raise ImageReadError(
                f"{path}: truncated PNG file (chunk {name} at offset {pos} declares {length} data bytes + CRC, "
                f"only {max(0, n - pos - 8)} bytes present)"
            )
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(view[pos + 4 : end - 4]) != crc:
            raise ImageReadError(f"{path}: corrupt PNG file (CRC mismatch in chunk {name} at offset {pos})")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise ImageReadError(f"{path}: corrupt PNG file (first chunk is {name}, not a 13-byte IHDR)")
            _check_ihdr(path, data[pos + 8 : pos + 21])
            first = False
        elif ctype == b"IHDR":
            raise ImageReadError(f"{path}: corrupt PNG file (second IHDR chunk at offset {pos})")
        if ctype == b"IDAT":
            idat += 1
        if ctype == b"IEND":
            break
        pos = end
    if not idat:
        raise ImageReadError(f"{path}: corrupt PNG file (no IDAT chunk: no image data)")


def _check_ihdr(path: Path, ihdr: bytes) -> None:
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", ihdr)
    if not (0 < w <= 0x7FFFFFFF and 0 < h <= 0x7FFFFFFF):
        raise ImageReadError(f"{path}: corrupt PNG file (IHDR width {w}, height {h}: must be 1 to 2^31-1)")
    if depth not in _PNG_DEPTHS.get(ctype, ()):
        raise ImageReadError(f"{path}: corrupt PNG file (IHDR colour type {ctype} with bit depth {depth} is not valid)")
    if comp or filt or interlace > 1:
        raise ImageReadError(
            f"{path}: corrupt PNG file (IHDR compression {comp}, filter {filt}, interlace {interlace}: "
            "only 0, 0, 0/1 exist)"
        )


# ----------------------------------------------------------------------------------------------- JPEG

#: start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT (C4), JPG (C8), DAC (CC)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: markers with a length field that may appear between SOI and EOI
_SEGMENTS = _SOF | {0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFE} | set(range(0xE0, 0xF0))


def check_jpeg(path: Path, data: bytes) -> None:
    """Walk a JPEG file's markers: each segment inside the file, a sane frame header before the first
    scan, scan data ending in a marker (restart markers in sequence), an end-of-image marker. Bytes
    after the end-of-image marker (camera trailers) are allowed."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise ImageReadError(f"{path}: corrupt JPEG file (no start-of-image marker)")
    pos, frame, scans = 2, None, 0
    while True:
        if pos >= n:
            raise ImageReadError(f"{path}: truncated JPEG file (ends at byte {n} without an end-of-image marker)")
        if data[pos] != 0xFF:
            raise ImageReadError(f"{path}: corrupt JPEG file (byte {data[pos]:#04x} at offset {pos} where a marker must be)")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise ImageReadError(f"{path}: truncated JPEG file (ends inside a marker at byte {n})")
        marker, at = data[pos], pos - 1
        pos += 1
        if marker == 0xD9:
            if not scans:
                raise ImageReadError(f"{path}: corrupt JPEG file (end-of-image marker at offset {at} before any image data)")
            return
        if marker not in _SEGMENTS:
            raise ImageReadError(f"{path}: corrupt JPEG file (unexpected marker 0xFF{marker:02X} at offset {at})")
        if pos + 2 > n:
            raise ImageReadError(f"{path}: truncated JPEG file (segment 0xFF{marker:02X} at offset {at} cut off)")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise ImageReadError(f"{path}: corrupt JPEG file (segment 0xFF{marker:02X} at offset {at}: length {length})")
        if pos + length > n:
            raise ImageReadError(
                f"{path}: truncated JPEG file (segment 0xFF{marker:02X} at offset {at} declares {length} bytes, "
                f"only {n - pos} present)"
            )
        seg = data[pos + 2 : pos + length]
        if marker in _SOF:
            if frame is not None:
                raise ImageReadError(f"{path}: corrupt JPEG file (second frame header at offset {at})")
            frame = _check_sof(path, seg, at)
        elif marker == 0xDA:
            if frame is None:
                raise ImageReadError(f"{path}: corrupt JPEG file (scan at offset {at} before any frame header)")
            ns = seg[0] if seg else 0
            if not 1 <= ns <= 4 or ns > frame or len(seg) != 4 + 2 * ns:
                raise ImageReadError(
                    f"{path}: corrupt JPEG file (scan header at offset {at}: {ns} components, length {length})"
                )
            scans += 1
            pos = _skip_entropy_data(path, data, pos + length)
            continue
        pos += length


def _check_sof(path: Path, seg: bytes, at: int) -> int:
    if len(seg) < 6:
        raise ImageReadError(f"{path}: corrupt JPEG file (frame header at offset {at} too short)")
    precision, h, w, nc = struct.unpack(">BHHB", seg[:6])
    if not 2 <= precision <= 16 or w == 0 or h == 0:
        raise ImageReadError(
            f"{path}: corrupt JPEG file (frame header at offset {at}: {w}x{h}, {precision}-bit: "
            "width and height must be non-zero)"
        )
    if nc not in (1, 3, 4) or len(seg) != 6 + 3 * nc:
        raise ImageReadError(f"{path}: corrupt JPEG file (frame header at offset {at}: {nc} components, {len(seg) + 2} bytes)")
    return nc


def _skip_entropy_data(path: Path, data: bytes, pos: int) -> int:
    """Offset of the first marker after a scan's entropy-coded data (0xFF00 is a stuffed byte, RSTn a
    restart marker: they must count 0..7 in turn)."""
    n, rst = len(data), 0
    while True:
        i = data.find(b"\xff", pos)
        if i < 0 or i + 1 >= n:
            raise ImageReadError(f"{path}: truncated JPEG file (scan data runs to the end of the file at byte {n})")
        nxt = data[i + 1]
        if nxt == 0x00:
            pos = i + 2
        elif 0xD0 <= nxt <= 0xD7:
            if nxt != 0xD0 + rst:
                raise ImageReadError(
                    f"{path}: corrupt JPEG file (restart marker RST{nxt - 0xD0} at offset {i}, expected RST{rst})"
                )
            rst = (rst + 1) % 8
            pos = i + 2
        elif nxt == 0xFF:  # fill bytes before a marker
            pos = i + 1
        else:
            return i


# ----------------------------------------------------------------------------------------------- TIFF


def check_tiff_page(path: Path, page: Any, file_size: int) -> None:
    """Geometry and strip/tile extents of a tifffile ``TiffPage``, before ``page.asarray()``."""
    w, h = int(page.imagewidth), int(page.imagelength)
    spp, bps = int(page.samplesperpixel), page.bitspersample
    if w < 1 or h < 1:
        raise ImageReadError(f"{path}: corrupt TIFF file (ImageWidth {w}, ImageLength {h}: both must be at least 1)")
    if not 1 <= spp <= 16:
        raise ImageReadError(f"{path}: corrupt TIFF file (SamplesPerPixel {spp})")
    bits = bps if isinstance(bps, tuple) else (bps,)
    if any(int(b) not in (1, 2, 4, 8, 16, 32, 64) for b in bits):
        raise ImageReadError(f"{path}: corrupt TIFF file (BitsPerSample {bps})")
    offsets, counts = tuple(page.dataoffsets), tuple(page.databytecounts)
    tiled = bool(page.is_tiled)
    what, field = ("tile", "TileByteCounts") if tiled else ("strip", "StripByteCounts")
    planes = spp if int(page.planarconfig) == 2 else 1
    if tiled:
        tw, tl = int(page.tilewidth), int(page.tilelength)
        if tw < 1 or tl < 1:
            raise ImageReadError(f"{path}: corrupt TIFF file (TileWidth {tw}, TileLength {tl})")
        need = math.ceil(w / tw) * math.ceil(h / tl) * planes
    else:
        rps = min(int(page.rowsperstrip) or h, h)
        need = math.ceil(h / rps) * planes
    if len(offsets) != len(counts) or len(offsets) < need:
        raise ImageReadError(
            f"{path}: corrupt TIFF file ({len(offsets)} {what} offsets and {len(counts)} {field} for an image "
            f"that needs {need} {what}s)"
        )
    raw = int(page.compression) == 1
    spans = sorted(set(zip(offsets[:need], counts[:need], strict=True)))  # one stored strip may be shared
    for (a, n), (b, _) in zip(spans, spans[1:], strict=False):
        if a + n > b:
            raise ImageReadError(
                f"{path}: corrupt TIFF file ({what}s overlap: {n} bytes at offset {a} run into the {what} at offset {b})"
            )
    for i, (off, count) in enumerate(zip(offsets[:need], counts[:need], strict=True)):
        if count == 0:
            raise ImageReadError(f"{path}: corrupt TIFF file ({what} {i}: {field} is 0, no data)")
        if off + count > file_size:
            raise ImageReadError(
                f"{path}: truncated TIFF file ({what} {i} at offset {off} declares {count} bytes, "
                f"only {max(0, file_size - off)} present in the file of {file_size} bytes)"
            )
        if raw:
            expected = _raw_segment_bytes(page, i, w, h, spp, planes, bits, tiled)
            if count < expected:
                raise ImageReadError(
                    f"{path}: corrupt TIFF file (uncompressed {what} {i}: {field} {count}, the geometry needs "
                    f"{expected} bytes)"
                )


def _raw_segment_bytes(page: Any, i: int, w: int, h: int, spp: int, planes: int, bits: tuple, tiled: bool) -> int:
    per_pixel = spp // planes if planes > 1 else spp
    bitdepth = int(bits[0])
    if tiled:
        return math.ceil(int(page.tilewidth) * per_pixel * bitdepth / 8) * int(page.tilelength)
    rps = min(int(page.rowsperstrip) or h, h)
    strips_per_plane = math.ceil(h / rps)
    rows = min(rps, h - (i % strips_per_plane) * rps)
    return math.ceil(w * per_pixel * bitdepth / 8) * rows


# ---------------------------------------------------------------------------------------------- DICOM

_UNDEFINED = 0xFFFFFFFF
_ITEM, _SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


def check_dicom_lengths(path: Path, ds: Any, file_size: int | None) -> None:
    """Declared lengths of the top-level elements (Pixel Data included) against the bytes present,
    before pydicom turns them into values: pydicom reads a 0xFFFFFFF0 length as "the rest of the file".
    ``file_size``: None for a deflated data set (offsets are then in the inflated stream)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.valuerep import VR

    known = {v.value for v in VR}
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)  # the raw element, unconverted (.value would convert it)
        if not isinstance(elem, RawDataElement) or elem.value_tell is None:
            continue
        if not elem.is_implicit_VR and elem.VR is not None and str(elem.VR) not in known:
            raise ImageReadError(
                f"{path}: corrupt DICOM file (element ({elem.tag.group:04X},{elem.tag.elem:04X}) at offset "
                f"{elem.value_tell} has the unknown value representation {str(elem.VR)!r})"
            )
        length = elem.length
        if length == _UNDEFINED:
            if int(elem.tag) == 0x7FE00010:  # the value stops before the sequence delimiter item
                end = elem.value_tell + len(elem.value or b"") + 8
                if file_size is not None and end > file_size:
                    raise ImageReadError(
                        f"{path}: truncated DICOM file (encapsulated pixel data at offset {elem.value_tell} has no "
                        "complete sequence delimiter: the file ends inside it)"
                    )
            continue
        present = len(elem.value) if elem.value is not None else 0
        past_end = file_size is not None and elem.value_tell + length > file_size
        if past_end or present < length:
            what = "pixel data" if int(elem.tag) == 0x7FE00010 else f"element ({elem.tag.group:04X},{elem.tag.elem:04X})"
            if file_size is not None:
                present = min(present, max(0, file_size - elem.value_tell))
            raise ImageReadError(
                f"{path}: truncated DICOM file ({what} at offset {elem.value_tell} declares {length} bytes, "
                f"only {present} present)"
            )


def fragments(where: object, value: bytes) -> tuple[list[int], list[tuple[int, int]]]:
    """(basic offset table, [(offset, length)] of the fragments) of encapsulated pixel data ``value``
    (the bytes between the Pixel Data header and the sequence delimiter). Raises ImageReadError for an
    item that is not an item or runs past the data."""
    n, pos, items = len(value), 0, []
    while pos < n:
        if pos + 8 > n:
            raise ImageReadError(f"{where}: truncated encapsulated pixel data (item header at byte {pos} cut off)")
        tag, length = value[pos : pos + 4], struct.unpack("<I", value[pos + 4 : pos + 8])[0]
        if tag != _ITEM:
            raise ImageReadError(
                f"{where}: corrupt encapsulated pixel data (byte {pos} of the pixel data holds tag "
                f"{tag.hex()}, not an item)"
            )
        if length == _UNDEFINED or pos + 8 + length > n:
            raise ImageReadError(
                f"{where}: truncated encapsulated pixel data (item {len(items)} at byte {pos} declares "
                f"{length} bytes, only {n - pos - 8} present)"
            )
        items.append((pos + 8, length))
        pos += 8 + length
    if not items:
        raise ImageReadError(f"{where}: corrupt encapsulated pixel data (no offset table item)")
    (bot_at, bot_len), frags = items[0], items[1:]
    if bot_len % 4:
        raise ImageReadError(f"{where}: corrupt encapsulated pixel data (basic offset table of {bot_len} bytes)")
    bot = list(struct.unpack(f"<{bot_len // 4}I", value[bot_at : bot_at + bot_len]))
    return bot, frags


#: transfer syntaxes whose fragments each start one frame's codestream: the start marker
_FRAME_START = {
    "1.2.840.10008.1.2.4.50": (b"\xff\xd8",),  # JPEG baseline
    "1.2.840.10008.1.2.4.51": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.57": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.70": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.80": (b"\xff\xd8",),  # JPEG-LS
    "1.2.840.10008.1.2.4.81": (b"\xff\xd8",),
    "1.2.840.10008.1.2.4.90": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),  # JPEG 2000 (codestream / JP2)
    "1.2.840.10008.1.2.4.91": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  "),
    "1.2.840.10008.1.2.4.201": (b"\xff\x4f\xff\x51",),  # HTJ2K
    "1.2.840.10008.1.2.4.202": (b"\xff\x4f\xff\x51",),
    "1.2.840.10008.1.2.4.203": (b"\xff\x4f\xff\x51",),
}
RLE = "1.2.840.10008.1.2.5"


def check_encapsulated(where: object, value: bytes, tsuid: str, frames: int, declared: bool) -> None:
    """The fragments of encapsulated pixel data against NumberOfFrames (``declared``: whether the
    attribute is present): one offset-table entry per frame, at least one fragment per frame, one
    fragment per frame for RLE, and for JPEG-family syntaxes as many codestream starts as frames."""
    bot, frags = fragments(where, value)
    nf = f"NumberOfFrames {frames}" if declared else "no NumberOfFrames (1 frame)"
    if not frags:
        raise ImageReadError(f"{where}: truncated or corrupt encapsulated pixel data (no fragment after the offset table)")
    if bot:
        if len(bot) != frames:
            raise ImageReadError(
                f"{where}: inconsistent DICOM: the basic offset table lists {len(bot)} frames, {nf}"
            )
        total = sum(8 + length for _, length in frags)
        if bot[0] != 0 or any(b >= a for a, b in zip(bot[1:], bot, strict=False)) or bot[-1] >= total:
            raise ImageReadError(f"{where}: corrupt encapsulated pixel data (basic offset table out of order or past the data)")
    if len(frags) < frames:
        raise ImageReadError(
            f"{where}: truncated or corrupt encapsulated pixel data: {len(frags)} fragment(s) for {nf}"
        )
    if tsuid == RLE and len(frags) != frames:
        raise ImageReadError(
            f"{where}: inconsistent DICOM: RLE holds one fragment per frame, found {len(frags)} fragments and {nf}"
        )
    starts = _FRAME_START.get(tsuid)
    if starts:
        heads = sum(1 for off, length in frags if value[off : off + min(length, 12)].startswith(starts))
        if heads == 0:
            raise ImageReadError(
                f"{where}: corrupt encapsulated pixel data: no fragment starts a codestream for this transfer syntax"
            )
        if heads != frames:
            raise ImageReadError(
                f"{where}: inconsistent DICOM: the pixel data holds {heads} encapsulated frames, {nf}"
            )


def check_dicom_geometry(where: object, ds: Any) -> None:
    """Rows/Columns/NumberOfFrames/BitsAllocated/BitsStored/HighBit/SamplesPerPixel/PlanarConfiguration
    each in range and consistent with each other (before decoding)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1:
        raise ImageReadError(f"{where}: corrupt DICOM image: Rows {rows}, Columns {cols} (both must be at least 1)")
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc))
    high = ds.get("HighBit")
    if high is not None and high != "" and not bits_stored - 1 <= int(high) < bits_alloc:
        raise ImageReadError(
            f"{where}: inconsistent DICOM bit depth: HighBit {int(high)} with BitsStored {bits_stored}, "
            f"BitsAllocated {bits_alloc} (HighBit must lie between BitsStored - 1 and BitsAllocated - 1)"
        )
    planar = ds.get("PlanarConfiguration")
    if int(ds.SamplesPerPixel) > 1 and planar not in (None, "") and int(planar) not in (0, 1):
        raise ImageReadError(f"{where}: corrupt DICOM image: PlanarConfiguration {int(planar)} (0 or 1)")
