"""The volume object: a numpy array in nibabel's voxel order plus a 4x4 RAS+ affine (world mm), as nibabel.

``Volume`` is the one type every part of the volume room speaks: readers return it, the through-plane method
takes and returns it, writers take it. Source metadata (format, DICOM series facts) rides along in ``meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class VolumeError(ValueError):
    """A volume that cannot be read, written or processed; the message names the file/series and the problem."""


@dataclass
class VolumeMeta:
    """What a volume came from and what is needed to write it back.

    ``source``: the file or folder read. ``format``: "nifti", "mgz" or "dicom". ``units``: "HU" for CT with a
    rescale to Hounsfield units, else "" (arbitrary MR units). ``series_uid``, ``study_uid``, ``datasets``:
    DICOM only (``datasets``: the source instances' headers without pixel data, sorted along the slice normal,
    or the one enhanced multi-frame dataset). ``notes``: what the reader detected or corrected (logged).
    ``tilt_deg``: DICOM series with gantry tilt: the angle between the slice axis and the slice normal (the
    affine is sheared by it); 0 for orthogonal grids.
    """

    source: Path | None = None
    format: str = ""
    units: str = ""
    series_uid: str | None = None
    study_uid: str | None = None
    modality: str | None = None
    datasets: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    header: Any = None  # the nibabel header of a NIfTI/MGZ source (kept for writing back)
    tilt_deg: float = 0.0


@dataclass
class Volume:
    """``array``: 3D numpy array indexed (i, j, k) as nibabel's ``get_fdata``/``dataobj`` for that file;
    ``affine``: 4x4 voxel (i, j, k, 1) -> RAS+ world mm."""

    array: np.ndarray
    affine: np.ndarray
    meta: VolumeMeta = field(default_factory=VolumeMeta)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise VolumeError(f"affine must be 4x4, got {self.affine.shape}")
        if np.asarray(self.array).ndim != 3:
            raise VolumeError(f"a volume is 3D, got an array of shape {np.asarray(self.array).shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine's 3x3 part)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def plane_distance(self, axis: int) -> float:
        """Distance in mm between consecutive voxel planes across ``axis`` (along the normal of the plane the
        other two axes span). Equals ``spacing[axis]`` unless the affine is sheared (gantry tilt), where the
        step between slices is longer than the distance between their planes."""
        m = self.affine[:3, :3]
        u, v = (m[:, i] for i in range(3) if i != axis)
        n = np.cross(u, v)
        norm = float(np.linalg.norm(n))
        if norm == 0.0:
            return float(np.linalg.norm(m[:, axis]))
        return abs(float(np.dot(m[:, axis], n))) / norm

    def __repr__(self) -> str:
        sp = "x".join(f"{v:.3g}" for v in self.spacing)
        src = f", source={self.meta.source}" if self.meta.source else ""
        return f"Volume(shape={self.shape}, spacing={sp} mm, dtype={self.array.dtype}{src})"
