"""In-memory image with what is needed to write it back (format, bit depth, photometric, DICOM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ImageReadError(ValueError):
    """A file could not be read as an image (message names the file and the problem)."""


class ImageWriteError(OSError):
    """A file could not be written."""


@dataclass
class Image:
    """Pixels as stored (H x W or H x W x C, uint8/uint16/float32; colour in RGB order).

    ``max_value``: the value that maps to 1.0 when normalising (255, 65535, or 2**BitsStored-1).
    ``photometric``: MONOCHROME2 (dark = low), MONOCHROME1 (dark = high, DICOM), RGB.
    ``dataset``: the source pydicom Dataset for DICOM input, else None.
    """

    pixels: np.ndarray
    format: str  # "png" | "jpeg" | "tiff" | "dicom"
    max_value: int
    photometric: str = "MONOCHROME2"
    path: Path | None = None
    dataset: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else int(self.pixels.shape[2])

    @property
    def dtype(self) -> np.dtype:
        return self.pixels.dtype
