"""``read_volume`` (any supported source) and ``probe_volume`` (is this path a volume? cheap header reads).

The CLI asks :func:`probe_volume` before treating a folder as 2D images: a folder that holds a CT/MR series
(>= ``MIN_SLICES`` images of one series, or one enhanced multi-frame file) is one volume, not 300 images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medsr.volumes.nifti import load_header, read_nifti, volume_file_kind
from medsr.volumes.volume import Volume, VolumeError

#: a folder is a volume when one CT/MR series in it has at least this many images
MIN_SLICES = 3

_PROBE_TAGS = ["SOPClassUID", "Modality", "SeriesInstanceUID", "NumberOfFrames", "Rows", "SeriesDescription"]


def read_volume(path: str | Path | list[str | Path], *, series_uid: str | None = None) -> Volume:
    """Read a volume: a NIfTI (.nii, .nii.gz) or FreeSurfer (.mgz/.mgh) file, a folder (or a list of files)
    holding one CT/MR DICOM series, or one enhanced multi-frame CT/MR file. ``series_uid`` picks a series
    where a folder holds several. Returns a :class:`Volume` (``.array`` in nibabel's voxel order, ``.affine``
    RAS+ mm, ``.meta``); anything that is not one regular 3D volume raises :class:`VolumeError`."""
    from medsr.volumes.dicom_series import read_dicom_series

    if isinstance(path, (list, tuple)):
        return read_dicom_series(list(path), series_uid)
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder")
    if volume_file_kind(p) is not None:
        return read_nifti(p)
    return read_dicom_series([p], series_uid)


@dataclass
class VolumeProbe:
    """What :func:`probe_volume` found. ``kind``: "nifti", "mgz", "dicom-series" or "dicom-enhanced";
    ``series``: {SeriesInstanceUID: number of images} of the CT/MR series with >= MIN_SLICES images
    (several: the reader needs ``series_uid``); ``description``: one line for the CLI to say what it detected."""

    path: Path
    kind: str
    description: str
    series: dict[str, int] = field(default_factory=dict)


def probe_volume(path: str | Path) -> VolumeProbe | None:
    """A :class:`VolumeProbe` if ``path`` is a volume (a 3D NIfTI/MGZ file, a folder with a CT/MR series of
    >= MIN_SLICES images, or an enhanced multi-frame CT/MR file with >= MIN_SLICES frames), else None (2D
    images, other DICOM, unreadable files). Reads headers only."""
    from medsr.volumes.dicom_series import is_ct_mr_image, list_files, read_header

    p = Path(path)
    if p.is_file() and volume_file_kind(p) is not None:
        try:
            img = load_header(p)
        except VolumeError:
            return None
        shape = tuple(int(n) for n in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) < 3:
            return None
        kind = volume_file_kind(p) or "nifti"
        return VolumeProbe(p, kind, f"{kind.upper()} volume {'x'.join(map(str, shape))}")
    if p.is_file():
        ds = read_header(p, _PROBE_TAGS)
        if ds is None or not is_ct_mr_image(ds):
            return None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames < MIN_SLICES:
            return None
        uid = str(ds.get("SeriesInstanceUID", ""))
        return VolumeProbe(p, "dicom-enhanced", f"{ds.get('Modality', '')} multi-frame volume, {frames} frames",
                           {uid: frames})
    if not p.is_dir():
        return None
    counts: dict[str, int] = {}
    modality: dict[str, str] = {}
    for f in list_files(p):
        ds = read_header(f, _PROBE_TAGS)
        if ds is None or not is_ct_mr_image(ds):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        counts[uid] = counts.get(uid, 0) + int(ds.get("NumberOfFrames", 1) or 1)
        modality[uid] = str(ds.get("Modality", "") or "")
    series = {u: n for u, n in counts.items() if n >= MIN_SLICES}
    if not series:
        return None
    if len(series) == 1:
        uid, n = next(iter(series.items()))
        desc = f"{modality[uid]} DICOM series {uid}: {n} images"
    else:
        desc = f"{len(series)} CT/MR DICOM series ({', '.join(f'{u}: {n} images' for u, n in series.items())})"
    return VolumeProbe(p, "dicom-series", desc, series)


def is_volume_path(path: str | Path) -> bool:
    """True if :func:`probe_volume` finds a volume at ``path``."""
    return probe_volume(path) is not None


__all__ = ["MIN_SLICES", "VolumeProbe", "is_volume_path", "probe_volume", "read_volume"]
