"""What the node needs from an upscaler (and, for CT/MR series, a volume method): a protocol, so that medsr.pacs never imports the API above it.

:class:`medsr.Upscaler` satisfies it; tests inject fakes (an engine that raises a CUDA error, a slow one).
The CLI (medsr/cli/node.py) builds the real ones and hands them to the node.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DicomUpscaler(Protocol):
    def upscale_dicom(self, ds: Any, *, dicom_syntax: str | None = None) -> Any:
        """A derived pydicom ``FileDataset`` (new SOP and series UIDs, same study) for source ``ds``."""
        ...


@runtime_checkable
class VolumeMethod(Protocol):
    """What the node needs to upscale a CT/MR series: :class:`medsr.volumes.VolumeUpscaler` satisfies it."""

    @property
    def model_id(self) -> str: ...

    @property
    def weights_sha256(self) -> str | None: ...

    def upscale_volume(self, volume: Any, *, axis: int | None = None, factor: float | None = None,
                       spacing: float | None = None, progress: Any = None, workdir: Any = None) -> Any:
        """The restored :class:`medsr.volumes.Volume` of ``volume``."""
        ...
