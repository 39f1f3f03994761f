"""NIfTI (.nii, .nii.gz) and FreeSurfer .mgz volumes, through nibabel.

Reading keeps nibabel's view of the file: the array is ``np.asanyarray(img.dataobj)`` (nibabel's voxel order,
the stored dtype when the file has no scaling, scl_slope/scl_inter applied otherwise: then float, as nibabel
gives it) and the affine is ``img.affine`` (sform if set, else qform, as nibabel chooses). Writing is atomic
(a temporary file beside the destination, renamed on success) and sets both the sform and the qform.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from medsr.fsutil import atomic_write_path, os_error_reason
from medsr.volumes.volume import Volume, VolumeError, VolumeMeta

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MGZ_SUFFIXES = (".mgz", ".mgh")
#: the file name endings read_volume takes as a volume file (lower case)
VOLUME_FILE_SUFFIXES = NIFTI_SUFFIXES + MGZ_SUFFIXES


def volume_file_kind(path: Path) -> str | None:
    """"nifti", "mgz" or None, from the file name."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(MGZ_SUFFIXES):
        return "mgz"
    return None


def load_header(path: Path) -> Any:
    """The nibabel image of ``path`` (header only: the data stays on disk); VolumeError if unreadable."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise VolumeError(f"{path}: no such file") from None
    except Exception as e:  # nibabel raises ImageFileError, ValueError, EOFError, gzip/zlib errors ...
        raise VolumeError(f"{path}: not a readable NIfTI/MGZ file ({type(e).__name__}: {str(e)[:160]})") from None


def read_nifti(path: str | Path) -> Volume:
    """Read a NIfTI-1/2 or MGH/MGZ file into a :class:`Volume` (see the module doc). A 4D file with one
    volume is taken as 3D; more volumes, 2D files and non-scalar data (RGB, complex) are refused."""
    path = Path(path)
    kind = volume_file_kind(path) or "nifti"
    img = load_header(path)
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        what = f"{len(shape)}D" if len(shape) != 4 else f"4D ({shape[3]} volumes)"
        raise VolumeError(f"{path}: a {what} image of shape {tuple(img.shape)}; a volume is 3D "
                          "(split a 4D series into 3D files first)")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.names is not None or dtype.kind not in "uif":
        raise VolumeError(f"{path}: voxel type {dtype} is not a scalar number (RGB or complex data is not supported)")
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated or corrupt data
        raise VolumeError(f"{path}: cannot read the voxel data ({type(e).__name__}: {str(e)[:160]})") from None
    arr = arr.reshape(shape)
    notes = []
    if arr.dtype != dtype:
        notes.append(f"scaled by the header (scl_slope/scl_inter): {dtype} stored, {arr.dtype} returned")
    meta = VolumeMeta(source=path, format=kind, header=img.header, notes=notes)
    if not np.all(np.isfinite(img.affine)):
        raise VolumeError(f"{path}: the affine holds non-finite values")
    return Volume(arr, np.array(img.affine, dtype=np.float64), meta)


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` as NIfTI-1 (``.nii`` or ``.nii.gz``) atomically; returns the path.

    The affine is stored as the sform (code 1, scanner) and as the qform (code 1; a sheared affine, e.g. a
    gantry-tilted CT, cannot be a qform: nibabel stores the nearest rigid one there, and readers that honour
    the sform, nibabel among them, get the exact affine). The dtype is kept (integers as they are, any float
    as float32, bool as uint8); no scaling is written (scl_slope = 1)."""
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise VolumeError(f"{path}: a NIfTI output must end in .nii or .nii.gz")
    arr = np.asanyarray(volume.array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    elif arr.dtype.kind not in "uif":
        raise VolumeError(f"{path}: cannot write voxel type {arr.dtype}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    header = nib.Nifti1Header()
    header.set_data_dtype(arr.dtype)
    img = nib.Nifti1Image(arr, affine, header=header)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    if not path.parent.is_dir():
        raise VolumeError(f"{path}: the folder {path.parent} does not exist")
    try:
        with atomic_write_path(path) as tmp:
            if path.name.lower().endswith(".gz"):
                with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) as f:
                    img.to_stream(f)
            else:
                with open(tmp, "wb") as f:
                    img.to_stream(f)
    except OSError as e:
        raise VolumeError(f"{path}: cannot write ({os_error_reason(e, path.parent)})") from None
    return path


__all__ = ["VOLUME_FILE_SUFFIXES", "read_nifti", "volume_file_kind", "write_nifti"]
