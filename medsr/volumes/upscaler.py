"""``VolumeUpscaler``: the volume path's API, numpy array + affine in, array + affine out (as nibabel).

>>> from medsr.volumes import VolumeUpscaler
>>> vu = VolumeUpscaler.load()                        # medsr-mr-tp on the CLI's default runtime
>>> hr, hr_affine = vu(img.get_fdata(), img.affine)  # thick slices -> isotropic at the in-plane spacing
>>> vu.upscale_file("t2_thick.nii.gz", "out/t2_thick.nii.gz")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsr.volumes.throughplane import plan, reconstruct
from medsr.volumes.volume import Volume, VolumeError

if TYPE_CHECKING:  # pragma: no cover
    from medsr.api import Upscaler

#: the model the volume path uses when none is named
DEFAULT_VOLUME_MODEL = "medsr-mr-tp"


class VolumeUpscaler:
    """Through-plane super-resolution (:mod:`medsr.volumes.throughplane`) on one slice ``Upscaler``.

    ``upscaler`` None runs the cubic B-spline interpolation alone (the baseline, no model)."""

    def __init__(self, upscaler: Upscaler | None, *, planes: int = 2) -> None:
        if upscaler is not None:
            d = upscaler.backend.descriptor
            if upscaler.scale != 1 or d.in_channels != 1:
                raise VolumeError(
                    f"model {upscaler.model_id!r} is x{upscaler.scale}, {d.in_channels}-channel: the volume path "
                    f"needs a 1-channel x1 through-plane model (e.g. {DEFAULT_VOLUME_MODEL})")
        self.upscaler = upscaler
        self.planes = planes

    @classmethod
    def load(cls, spec: str | os.PathLike[str] | None = None, *, runtime: str = "auto", device: str = "auto",
             precision: str | None = None, tile: int | None = None, overlap: int | None = None,
             batch: int | None = None, planes: int = 2) -> VolumeUpscaler:
        """A through-plane model by name or file (None: ``medsr-mr-tp``), loaded by ``Upscaler.load``'s rule."""
        from medsr.api import Upscaler

        up = Upscaler.load(spec or DEFAULT_VOLUME_MODEL, runtime=runtime, device=device, precision=precision,
                           tile=tile, overlap=overlap, batch=batch)
        return cls(up, planes=planes)

    @property
    def model_id(self) -> str:
        return self.upscaler.model_id if self.upscaler is not None else "bspline"

    @property
    def weights_sha256(self) -> str | None:
        return self.upscaler.weights_sha256 if self.upscaler is not None else None

    def __repr__(self) -> str:
        inner = repr(self.upscaler) if self.upscaler is not None else "B-spline only"
        return f"VolumeUpscaler({inner}, planes={self.planes})"

    def __call__(self, array: np.ndarray, affine: np.ndarray, *, axis: int | None = None,
                 factor: float | None = None, spacing: float | None = None, profile: float | None = None,
                 progress: Callable[[int, int], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
        out = self.upscale_volume(Volume(np.asarray(array), affine), axis=axis, factor=factor, spacing=spacing,
                                  profile=profile, progress=progress)
        return np.asarray(out.array), out.affine

    def upscale_volume(self, volume: Volume, *, axis: int | None = None, factor: float | None = None,
                       spacing: float | None = None, progress: Callable[[int, int], object] | None = None,
                       workdir: str | os.PathLike[str] | None = None, profile: float | None = None) -> Volume:
        """``profile``: the slice profile's FWHM in slice gaps (None: a DICOM SliceThickness, else 1)."""
        return reconstruct(volume, self.upscaler, axis=axis, factor=factor, target_spacing=spacing,
                           planes=self.planes, progress=progress, workdir=workdir, profile=profile)

    def plan(self, volume: Volume, **kw: Any) -> Any:
        return plan(volume, **kw)

    def upscale_file(self, src: str | os.PathLike[str] | list[Path], dst: str | os.PathLike[str], *,
                     overwrite: bool = False, series_uid: str | None = None,
                     axis: int | None = None, factor: float | None = None, spacing: float | None = None,
                     progress: Callable[[int, int], object] | None = None, log: Callable[[str], object] | None = None,
                     dicom_syntax: str | None = None) -> Path:
        """Read a NIfTI/MGZ file or a DICOM series, restore it, write ``dst``: a .nii/.nii.gz file, or a folder
        (a derived DICOM series) when the input is DICOM and ``dst`` has no NIfTI suffix."""
        from medsr.volumes.derive import write_dicom_series
        from medsr.volumes.io import read_volume
        from medsr.volumes.nifti import write_nifti

        src_p = Path(src[0]).parent if isinstance(src, list) else Path(src)
        dst_p = Path(dst)
        if dst_p.exists() and dst_p.resolve() == src_p.resolve():
            raise ValueError(f"{dst_p}: refusing to write over the input")
        if dst_p.exists() and not overwrite:
            raise FileExistsError(f"{dst_p}: output exists (pass overwrite to replace it)")
        vol = read_volume(src if isinstance(src, list) else src_p, series_uid=series_uid)
        p = plan(vol, axis=axis, factor=factor, target_spacing=spacing)
        if log is not None:
            for note in vol.meta.notes:
                log(f"{src_p}: {note}")
            log(f"{src_p}: {p.describe()}")
        out = self.upscale_volume(vol, axis=axis, factor=factor, spacing=spacing, progress=progress,
                                  workdir=dst_p.parent if dst_p.parent.exists() else None)
        dst_p.parent.mkdir(parents=True, exist_ok=True)
        if is_nifti_name(dst_p):
            return write_nifti(out, dst_p)
        if vol.meta.format != "dicom":
            raise VolumeError(f"{dst_p}: a NIfTI/MGZ input is written as NIfTI (.nii or .nii.gz)")
        write_dicom_series(out, vol, dst_p, weights_sha256=self.weights_sha256, model_id=self.model_id,
                           factor=p.factor, syntax=dicom_syntax, overwrite=overwrite)
        return dst_p


def is_nifti_name(path: str | os.PathLike[str]) -> bool:
    n = Path(path).name.lower()
    return n.endswith((".nii", ".nii.gz"))
