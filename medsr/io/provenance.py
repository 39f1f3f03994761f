"""Provenance: what made an output, written into every output and read back before a job runs.

One text line, the same in every format::

    medsr 0.1.0; model medsr-cxr-x4; weights-sha256 9f4c...; source-sha256 9f4c...; scale x4; runtime openvino; precision fp32

- PNG: a ``tEXt`` chunk ``medsr`` (this line) and ``Software`` (``medsr <version>``), placed before the image data;
- TIFF: the ImageDescription tag (this line) and the Software tag;
- JPEG: a COM (comment) segment holding this line;
- DICOM: the derived instance's ContributingEquipmentSequence item (ContributionDescription ends with this line).

``source-sha256`` is the sha256 of the file the model was loaded from (weights or engine): it is known before
the model loads, so ``medsr-infer`` can decide to skip an existing output without loading anything.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import zlib
from pathlib import Path

#: the order of the fields in the text line
FIELDS = ("model", "weights-sha256", "source-sha256", "scale", "runtime", "precision")
#: what must agree for an existing output to count as this job's (None on either side: not compared)
IDENTITY_FIELDS = ("source-sha256", "runtime", "precision")
PNG_KEY = b"medsr"
_SIG = b"\x89PNG\r\n\x1a\n"
_LINE_RE = re.compile(r"medsr (?P<version>[^;]+)(?P<rest>(?:; [\w-]+ [^;]+)*)")


def format_provenance(prov: dict[str, str]) -> str:
    """The provenance line for ``prov`` (``version`` plus any of :data:`FIELDS`)."""
    parts = [f"medsr {prov.get('version', '?')}"]
    parts += [f"{k} {prov[k]}" for k in FIELDS if prov.get(k)]
    return "; ".join(parts)


def parse_provenance(text: str) -> dict[str, str] | None:
    """The fields of the last provenance line in ``text`` (a tag, a comment, a DICOM description), or None."""
    found = None
    for m in _LINE_RE.finditer(text):
        found = m
    if found is None:
        return None
    prov = {"version": found["version"].strip()}
    for item in found["rest"].split("; ")[1:]:
        key, _, value = item.partition(" ")
        if key in FIELDS:
            prov[key] = value.strip()
    return prov


def same_job(existing: dict[str, str] | None, job: dict[str, str | None]) -> bool:
    """True when an output with provenance ``existing`` is what ``job`` would write (its identity fields agree;
    a field the job does not know before loading is not compared)."""
    if existing is None:
        return False
    return all(existing.get(k) == v for k in IDENTITY_FIELDS if (v := job.get(k)) is not None)


# ------------------------------------------------------------------------------------------ write


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def embed_png(path: Path, text: str, software: str) -> None:
    """Insert ``tEXt`` chunks (``medsr``: ``text``; ``Software``: ``software``) after IHDR of the PNG at ``path``.

    Streams the file through a sibling temporary (no whole-image copy in memory)."""
    chunks = _png_chunk(b"tEXt", PNG_KEY + b"\0" + text.encode("latin-1", "replace")) + \
        _png_chunk(b"tEXt", b"Software\0" + software.encode("latin-1", "replace"))
    with open(path, "rb") as src:
        head = src.read(8 + 25)  # signature + IHDR (length 13: 4 + 4 + 13 + 4)
        if head[:8] != _SIG or head[12:16] != b"IHDR":
            raise ValueError(f"{path}: not a PNG written by the encoder")
        _rewrite(path, src, head + chunks)


def embed_jpeg(path: Path, text: str) -> None:
    """Insert a COM segment holding ``text`` after the JFIF APP0 segment (or right after SOI)."""
    data = text.encode("utf-8")[:65533]
    com = b"\xff\xfe" + struct.pack(">H", len(data) + 2) + data
    with open(path, "rb") as src:
        head = src.read(4)
        if head[:2] != b"\xff\xd8":
            raise ValueError(f"{path}: not a JPEG written by the encoder")
        if head[2:4] == b"\xff\xe0":
            (n,) = struct.unpack(">H", src.read(2))
            head += struct.pack(">H", n) + src.read(n - 2)
            _rewrite(path, src, head + com)
        else:
            src.seek(2)
            _rewrite(path, src, b"\xff\xd8" + com)


def _rewrite(path: Path, rest: object, prefix: bytes) -> None:
    tmp = path.with_name(path.name + ".prov")
    try:
        with open(tmp, "wb") as out:
            out.write(prefix)
            shutil.copyfileobj(rest, out, 1 << 20)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- read


def read_provenance(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The provenance medsr wrote into the file at ``path`` (PNG, TIFF, JPEG or DICOM), or None when it holds
    none (not written by medsr, or unreadable). Reads headers only, never the pixels."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(132)
            if head.startswith(_SIG):
                return _png_text(f)
            if head.startswith(b"\xff\xd8"):
                f.seek(2)
                return _jpeg_comment(f)
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff_text(p)
        if head[128:132] == b"DICM" or p.suffix.lower() in ("", ".dcm", ".dicom"):
            return _dicom_text(p)
    except (OSError, ValueError, struct.error):
        return None
    return None


def _png_text(f: object) -> dict[str, str] | None:
    f.seek(8)  # type: ignore[attr-defined]
    while True:
        hdr = f.read(8)  # type: ignore[attr-defined]
        if len(hdr) < 8:
            return None
        n, kind = struct.unpack(">I", hdr[:4])[0], hdr[4:]
        if kind in (b"IDAT", b"IEND"):
            return None
        body = f.read(n)  # type: ignore[attr-defined]
        f.seek(4, 1)  # type: ignore[attr-defined]
        if kind == b"tEXt" and body.startswith(PNG_KEY + b"\0"):
            return parse_provenance(body[len(PNG_KEY) + 1:].decode("latin-1"))


def _jpeg_comment(f: object) -> dict[str, str] | None:
    while True:
        marker = f.read(2)  # type: ignore[attr-defined]
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xDA, 0xD9):  # start of scan / end: no comment
            return None
        (n,) = struct.unpack(">H", f.read(2))  # type: ignore[attr-defined]
        body = f.read(n - 2)  # type: ignore[attr-defined]
        if marker[1] == 0xFE:
            prov = parse_provenance(body.decode("utf-8", "replace"))
            if prov is not None:
                return prov


def _tiff_text(p: Path) -> dict[str, str] | None:
    import tifffile

    with tifffile.TiffFile(p) as tf:
        tag = tf.pages[0].tags.get("ImageDescription")  # type: ignore[union-attr]
        return parse_provenance(str(tag.value)) if tag is not None else None


def _dicom_text(p: Path) -> dict[str, str] | None:
    import pydicom

    ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["ContributingEquipmentSequence"])
    items = ds.get("ContributingEquipmentSequence") or []
    for item in reversed(list(items)):
        prov = parse_provenance(str(item.get("ContributionDescription", "")))
        if prov is not None:
            return prov
    return None
