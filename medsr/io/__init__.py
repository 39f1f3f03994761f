"""Image I/O: PNG/JPEG/TIFF (8/16-bit, gray/RGB) and DICOM, keeping format and bit depth."""

from __future__ import annotations

from typing import Any

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


def __getattr__(name: str) -> Any:
    """``derive_dicom`` (:func:`medsr.io.dicom_derive.derive_dicom`), imported on first use: pydicom loads lazily."""
    if name == "derive_dicom":
        from medsr.io.dicom_derive import derive_dicom

        return derive_dicom
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
