"""io's bottom layer: the in-memory :class:`Image`, the error types, the pixel limit and the suffix tables.

Every other io module (the format readers/writers and the read/write dispatch in :mod:`medsr.io.image`)
imports from here and this module imports none of them, so io has no import circle. Nothing here touches
pydicom or cv2.
"""

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
    """Pixels as stored (H x W or H x W x C, uint8/uint16/int16; colour in RGB order).

    ``max_value``: the value that maps to 1.0 when normalising (255, 65535, or 2**BitsStored-1).
    ``photometric``: MONOCHROME2 (dark = low), MONOCHROME1 (dark = high: DICOM, or TIFF
    min-is-white), RGB.
    ``dataset``: the source pydicom Dataset for DICOM input (the derived one for DICOM output),
    else None. It is kept out of ``repr`` so that logging an Image never prints patient data.
    ``meta``: format details (``bits_stored``, ``signed``, ``png_bit_depth``, ``jpeg_quality``,
    ``tiff_compression``, ``tiff_resolution``, ``alpha_dropped``, ``transfer_syntax``, ...).
    """

    pixels: np.ndarray = field(repr=False)
    format: str  # "png" | "jpeg" | "tiff" | "dicom"
    max_value: int
    photometric: str = "MONOCHROME2"
    path: Path | None = None
    dataset: Any = field(default=None, repr=False)
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

    @property
    def frames(self) -> int:
        """Number of frames (multi-frame DICOM; ``pixels`` then holds the first frame only)."""
        return int(self.meta.get("frames", 1))

    @property
    def bits_stored(self) -> int:
        """Significant bits per sample (BitsStored for DICOM, the container depth otherwise)."""
        return int(self.meta.get("bits_stored", self.pixels.dtype.itemsize * 8))

    @property
    def signed(self) -> bool:
        """True for DICOM PixelRepresentation 1 (two's complement stored values)."""
        return bool(self.meta.get("signed", False))

    @property
    def value_range(self) -> tuple[int, int]:
        """Smallest and largest storable value (the BitsStored range)."""
        bits = self.bits_stored
        if self.signed:
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, int(self.max_value)

    def __repr__(self) -> str:  # shape/dtype only: never pixel values or DICOM attributes
        return (
            f"Image(format={self.format!r}, shape={tuple(self.pixels.shape)}, dtype={self.pixels.dtype}, "
            f"max_value={self.max_value}, photometric={self.photometric!r}, path={self.path!r})"
        )


#: Largest image (LR pixels, all frames) read by default: above the largest real radiographs
#: (43x43 cm at 100 um = 18.5 MP) and fundus photographs (24 MP); ``--max-pixels`` / ``max_pixels=``.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageTooLargeError(ImageReadError):
    """The header declares more pixels than the configured limit; nothing was decoded."""


# ------------------------------------------------------------------------------------- suffixes

RASTER_SUFFIXES: dict[str, str] = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".jpe": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
}
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
SUPPORTED_SUFFIXES: set[str] = set(RASTER_SUFFIXES) | set(DICOM_SUFFIXES)
#: suffix used by :func:`output_suffix` per format
DEFAULT_SUFFIX: dict[str, str] = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}


# ------------------------------------------------------------------------------------ signatures

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff_format(head: bytes) -> str | None:
    """Format from the first 132+ bytes of a file, or None when no signature matches. ``DICM`` at
    offset 128 wins: a DICOM preamble may itself hold a TIFF header (dual-format files)."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    return None
