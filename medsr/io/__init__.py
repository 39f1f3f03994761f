"""Image I/O: PNG/JPEG/TIFF (8/16-bit, gray/RGB) and DICOM, keeping format and bit depth."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medsr.io.image import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_SUFFIXES,
    Image,
    ImageReadError,
    ImageTooLargeError,
    ImageWriteError,
    float_to_stored,
    is_supported,
    make_output,
    output_suffix,
    read_image,
    to_float,
    write_image,
)

if TYPE_CHECKING:
    from datetime import datetime

    import numpy as np


def derive_dicom(
    src_ds: Any,
    pixels: np.ndarray,
    scale: int,
    model_id: str,
    *,
    weights_sha256: str | None = None,
    syntax: Any = None,
    now: datetime | None = None,
    source_pixels: np.ndarray | None = None,
) -> Any:
    """The derived DICOM instance (see :func:`medsr.io.dicom_derive.derive_dicom`); pydicom loads lazily."""
    from medsr.io.dicom_derive import derive_dicom as _derive

    return _derive(src_ds, pixels, scale, model_id, weights_sha256=weights_sha256, syntax=syntax, now=now,
                   source_pixels=source_pixels)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "Image",
    "ImageReadError",
    "ImageTooLargeError",
    "ImageWriteError",
    "derive_dicom",
    "float_to_stored",
    "is_supported",
    "make_output",
    "output_suffix",
    "read_image",
    "to_float",
    "write_image",
]
