"""Volumes: through-plane super-resolution of 3D MRI/CT (NIfTI, MGZ, DICOM series), slice-wise in two planes.

A room above the runtime: it reuses ``Upscaler`` and ``medsr.io``; nothing below imports it.
Reading and writing: :func:`read_volume`, :func:`write_nifti`, :func:`write_dicom_series`,
:func:`probe_volume` (docs/volumes.md).
"""

from __future__ import annotations

from medsr.volumes.derive import write_dicom_series
from medsr.volumes.io import VolumeProbe, is_volume_path, probe_volume, read_volume
from medsr.volumes.nifti import write_nifti
from medsr.volumes.upscaler import VolumeUpscaler
from medsr.volumes.volume import Volume, VolumeError, VolumeMeta

__all__ = [
    "Volume",
    "VolumeError",
    "VolumeMeta",
    "VolumeProbe",
    "VolumeUpscaler",
    "is_volume_path",
    "probe_volume",
    "read_volume",
    "write_dicom_series",
    "write_nifti",
]
