"""Volumes: through-plane super-resolution of 3D MRI/CT (NIfTI, MGZ, DICOM series), slice-wise in two planes.

A room above the runtime: it reuses ``Upscaler`` and ``medsr.io``; nothing below imports it.
"""

from __future__ import annotations

from medsr.volumes.volume import Volume, VolumeError, VolumeMeta

__all__ = ["Volume", "VolumeError", "VolumeMeta"]
