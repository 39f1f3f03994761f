"""The identity of a derived instance as the node sends it: UIDs and series date/time.

- **SOP Instance UID**: from the upscaler's derived UID (source SOP Instance UID, weights sha256 or model
  id, scale, output encoding) *and* the sha256 of the source pixel data: the same source re-sent gives the
  same UID (the PACS keeps one copy), the same UID with other pixels gives another derived instance.
- **Series Instance UID**: the upscaler's (source series + model), so one derived series per source series.
- **UID root**: ``[model] uid_root`` (an organisation's root); default medsr's.
- **Series Date / Time**: the source series' (else the study's), so every instance of one derived series
  carries the same values whatever the time each one was upscaled.
- **CT/MR series** (the volume path, :func:`finish_series`): the derived series' UIDs (from the source series
  UID, weights, factor and slice index: medsr.volumes.derive) made specific to the *content* of the
  collected series, the sha256 of its (SOP Instance UID, pixel sha256) pairs: the same series re-sent gives the
  same UIDs; another set of slices (a late slice collected alone, a re-sent series with other pixels) gives
  another derived series, never other pixels under a UID already sent.

Not in the UIDs: precision (fp32 / bf16 / fp16) and engine (torch / ONNX / OpenVINO / TensorRT) of one set of
weights. They change output pixels by at most a few grey levels; a node whose precision or engine changes
should also change ``uid_root`` (or accept that a re-sent source keeps its earlier derived UID).
"""

from __future__ import annotations

import hashlib
from typing import Any


def _root(uid_root: str | None) -> str:
    from medsr.io.dicom import UID_PREFIX

    return uid_root.rstrip(".") + "." if uid_root else UID_PREFIX


def pixel_digest(src: Any) -> str:
    data = src.get("PixelData", b"") or b""
    return hashlib.sha256(bytes(data)).hexdigest()


def final_uids(base_sop: str, base_series: str, src_pixel_sha256: str, uid_root: str | None) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) the node sends, from the upscaler's derived UIDs."""
    from pydicom.uid import generate_uid

    root = _root(uid_root)
    sop = generate_uid(root, entropy_srcs=["medsr-node", "sop", base_sop, src_pixel_sha256])
    series = base_series if uid_root is None else generate_uid(root, entropy_srcs=["medsr-node", "series", base_series])
    return str(sop), str(series)


def series_digest(members: list[tuple[str, str]]) -> str:
    """The content of a collected series: sha256 of its sorted (SOP Instance UID, pixel sha256) pairs."""
    h = hashlib.sha256()
    for uid, pix in sorted(members):
        h.update(f"{uid}\0{pix}\n".encode())
    return h.hexdigest()


def series_final_uids(base_sop: str, base_series: str, content: str, uid_root: str | None) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) the node sends for a derived slice of a CT/MR series."""
    from pydicom.uid import generate_uid

    root = _root(uid_root)
    sop = generate_uid(root, entropy_srcs=["medsr-node", "volume-sop", base_sop, content])
    series = generate_uid(root, entropy_srcs=["medsr-node", "volume-series", base_series, content])
    return str(sop), str(series)


def finish_series(derived: Any, src: Any, content: str, uid_root: str | None) -> None:
    """:func:`finish` for a derived slice of a CT/MR series (``src``: a source header of the series)."""
    sop, series = series_final_uids(str(derived.SOPInstanceUID), str(derived.SeriesInstanceUID), content, uid_root)
    _set(derived, src, sop, series)


def finish(derived: Any, src: Any, uid_root: str | None) -> None:
    """Set the node's UIDs and the deterministic series date/time on a derived dataset (in place)."""
    sop, series = final_uids(str(derived.SOPInstanceUID), str(derived.SeriesInstanceUID), pixel_digest(src), uid_root)
    _set(derived, src, sop, series)


def _set(derived: Any, src: Any, sop: str, series: str) -> None:
    derived.SOPInstanceUID = sop
    derived.SeriesInstanceUID = series
    meta = getattr(derived, "file_meta", None)
    if meta is not None:
        meta.MediaStorageSOPInstanceUID = sop
    for date_key, time_key in (("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime")):
        date = src.get(date_key)
        if date:
            derived.SeriesDate = date
            if src.get(time_key):
                derived.SeriesTime = src.get(time_key)
            elif "SeriesTime" in derived:
                del derived.SeriesTime
            break
