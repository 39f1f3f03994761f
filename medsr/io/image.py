"""In-memory image with what is needed to write it back (format, bit depth, photometric, DICOM).

Also the format-independent entry points: :func:`read_image` / :func:`write_image` (dispatch on
content and suffix), :func:`to_float` / :func:`float_to_stored` (the model's [0, 1] view of the
stored values and back) and :func:`make_output` (an output :class:`Image` that keeps the input's
format and bit depth). Nothing here logs or puts patient data in messages: only paths, shapes,
dtypes and format details.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from medsr.io.base import (  # noqa: F401  (re-exported: medsr.io.image was their home)
    DEFAULT_MAX_PIXELS,
    DEFAULT_SUFFIX,
    DICOM_SUFFIXES,
    RASTER_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Image,
    ImageReadError,
    ImageTooLargeError,
    ImageWriteError,
)

log = logging.getLogger("medsr.io")


# --------------------------------------------------------------------------------------- suffixes

def is_supported(path: str | os.PathLike[str]) -> bool:
    """True for a supported suffix (case-insensitive), or no suffix (read as DICOM)."""
    suffix = Path(path).suffix.lower()
    return suffix in SUPPORTED_SUFFIXES or suffix == ""


def output_suffix(img: Image, path: str | os.PathLike[str] | None = None) -> str:
    """The suffix to give an output of ``img``: the input's own suffix when it agrees with the
    format (so ``a.tiff`` -> ``.tiff``, DICOM without suffix -> ``""``), else the default one."""
    if path is not None:
        suffix = Path(path).suffix.lower()
        if _suffix_agrees(img.format, suffix):
            return Path(path).suffix
    return DEFAULT_SUFFIX[img.format]


def _suffix_agrees(fmt: str, suffix: str) -> bool:
    suffix = suffix.lower()
    if fmt == "dicom":  # DICOM files are often named by UID ("1.2.840.113619.2.55.3"): any non-raster suffix
        return suffix in DICOM_SUFFIXES or suffix not in RASTER_SUFFIXES
    return RASTER_SUFFIXES.get(suffix) == fmt


# ------------------------------------------------------------------------------------------ reading

from medsr.io.base import _TIFF_MAGIC, sniff_format  # noqa: E402  (re-exported: the signatures live in base)


def check_regular_file(p: Path) -> None:
    """Refuse FIFOs, devices, sockets and directories before anything opens them (a FIFO blocks)."""
    import stat

    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError(f"{p}: file not found" + (" (dangling symbolic link)" if p.is_symlink() else "")) from None
    except OSError as e:
        raise ImageReadError(f"{p}: cannot open ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"{p}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a special file")
        raise ImageReadError(f"{p}: is {kind}, not a regular file; only regular files are read")


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image:
    """Read a PNG/JPEG/TIFF/DICOM file; the format comes from the content, the suffix only decides
    whether a file without a known signature is tried as (preamble-less) DICOM.

    Only regular files are read. The dimensions are read from the header first: an image of more
    than ``max_pixels`` pixels (all frames; ``None`` = no limit) is refused before decoding.
    Raises :class:`ImageReadError` (naming the file and the problem) for anything unreadable.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    check_regular_file(p)
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except FileNotFoundError:
        raise ImageReadError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{p}: is a directory, not an image file") from None
    except OSError as e:
        raise ImageReadError(f"{p}: cannot open ({e.strerror or type(e).__name__})") from None
    if not head:
        raise ImageReadError(f"{p}: file is empty")

    fmt = sniff_format(head)
    if fmt is None:
        if suffix in DICOM_SUFFIXES or suffix == "":
            fmt = "dicom"  # DICOM without the 128-byte preamble: pydicom decides
        elif suffix in RASTER_SUFFIXES and _signature_prefix(RASTER_SUFFIXES[suffix], head):
            raise ImageReadError(
                f"{p}: truncated {RASTER_SUFFIXES[suffix].upper()} file ({len(head)} bytes: it ends inside the file "
                "signature)"
            )
        elif suffix in RASTER_SUFFIXES:
            raise ImageReadError(
                f"{p}: not a valid {RASTER_SUFFIXES[suffix].upper()} file (unrecognised file signature: corrupt, "
                "or another kind of file)"
            )
        else:
            raise ImageReadError(
                f"{p}: unsupported file type {suffix!r} (supported: {', '.join(sorted(SUPPORTED_SUFFIXES))})"
            )
    elif suffix and suffix in SUPPORTED_SUFFIXES and not _suffix_agrees(fmt, suffix):
        log.warning("%s: content is %s although the suffix says %s; reading as %s", p, fmt, suffix, fmt)
    if max_pixels is not None:
        _check_size(p, fmt, max_pixels)

    if fmt == "dicom":
        from medsr.io.dicom import read_dicom

        img = read_dicom(p)
    else:
        from medsr.io.raster import read_raster

        img = read_raster(p, fmt)
    log.debug(
        "read %s: %s %s %s max=%d %s",
        p,
        img.format,
        tuple(img.pixels.shape),
        img.dtype,
        img.max_value,
        img.photometric,
    )
    return img


_SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",), "tiff": _TIFF_MAGIC}


def _signature_prefix(fmt: str, head: bytes) -> bool:
    """True if ``head`` is a proper beginning of one of ``fmt``'s signatures (the file was cut inside it)."""
    return any(len(head) < len(sig) and sig.startswith(head) for sig in _SIGNATURES[fmt])


def _check_size(p: Path, fmt: str, max_pixels: int) -> None:
    from medsr.io.probe import check_deflate_size, dicom_is_deflated, header_size

    if fmt == "dicom" and dicom_is_deflated(p):  # inflating is itself the bomb: cap it before parsing
        check_deflate_size(p, max_pixels * 8 + (16 << 20))  # up to 4 samples x 16 bit, plus the header
    h, w, frames = header_size(p, fmt)
    n = h * w * frames
    if n > max_pixels:
        what = f"{w}x{h}" + (f"x{frames} frames" if frames > 1 else "")
        raise ImageTooLargeError(
            f"{p}: image is {what} ({n / 1e6:.1f} MP), above the limit of {max_pixels / 1e6:g} MP; "
            "refusing to decode it (raise the limit with --max-pixels / max_pixels= if it is genuine)"
        )


# ------------------------------------------------------------------------------------ normalising


def _offset(img: Image) -> int:
    return 2 ** (img.bits_stored - 1) if img.signed else 0


def to_float(img: Image) -> np.ndarray:
    """Stored values -> float32 H x W x C in [0, 1] (C = 1 for gray).

    ``(v + offset) / max_value`` with offset 2**(BitsStored-1) for signed DICOM; MONOCHROME1 is
    inverted (``1 - x``) so that the model always sees MONOCHROME2 polarity.
    """
    from medsr.pixels import to_unit

    a = img.pixels
    if a.ndim == 2:
        a = a[:, :, None]
    x = to_unit(a, img.max_value, _offset(img))
    if img.photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), x, out=x)
    return x


def float_to_stored(strip: np.ndarray, like: Image) -> np.ndarray:
    """Inverse of :func:`to_float` for a float strip h x W x C (or h x W): clip to [0, 1],
    re-invert MONOCHROME1, scale, round, clip to the BitsStored range, cast to ``like.dtype``.

    Works row-strip by row-strip (no whole-image statistics). Returns h x W for one channel,
    h x W x C otherwise.
    """
    from medsr.pixels import from_unit

    x = np.asarray(strip, dtype=np.float32)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[:, :, 0]
    if like.photometric == "MONOCHROME1":
        x = np.float32(1.0) - np.clip(x, 0.0, 1.0)
    lo, hi = like.value_range
    return from_unit(x, like.dtype, like.max_value, _offset(like), lo, hi)


# ----------------------------------------------------------------------------------------- output


def make_output(
    src: Image,
    pixels: np.ndarray,
    scale: int,
    model_id: str,
    *,
    weights_sha256: str | None = None,
    dicom_syntax: Any = None,
    provenance: dict[str, str] | None = None,
) -> Image:
    """The output Image for ``pixels`` (already stored dtype/layout, ``scale`` x the input size):
    same format, bit depth and photometric as ``src``; for DICOM a derived dataset
    (:func:`medsr.io.dicom_derive.derive_dicom`: UIDs from the source, ``weights_sha256`` and the
    scale; encoded in ``dicom_syntax``, default JPEG 2000 lossless). Multi-frame DICOM goes through
    :func:`medsr.io.dicom_derive.derive_frames` instead. ``provenance`` (:mod:`medsr.io.provenance`) is
    written into the output by :func:`write_image` (PNG text chunk, TIFF tags, JPEG comment; DICOM: the
    derived UIDs and ContributingEquipmentSequence)."""
    if pixels.dtype != src.dtype:
        raise ValueError(f"output pixels are {pixels.dtype}, expected the input's {src.dtype}")
    if src.frames != 1:
        raise ValueError(f"a {src.frames}-frame DICOM is upscaled frame by frame (medsr.io.dicom_derive.derive_frames)")
    if pixels.shape[:2] != (src.height * scale, src.width * scale) or (pixels.ndim == 3) != (
        src.pixels.ndim == 3
    ):
        raise ValueError(
            f"output pixels have shape {pixels.shape}, expected {src.height * scale} x {src.width * scale}"
            f"{'' if src.pixels.ndim == 2 else f' x {src.channels}'}"
        )
    meta = dict(src.meta)
    meta["scale"] = scale
    meta["model_id"] = model_id
    meta.pop("alpha_dropped", None)
    meta.pop("provenance", None)
    if provenance is not None:
        meta["provenance"] = dict(provenance)
    res = meta.get("tiff_resolution")
    if res is not None:
        meta["tiff_resolution"] = (float(res[0]) * scale, float(res[1]) * scale)
    dataset = None
    if src.format == "dicom":
        from medsr.io.dicom_derive import derive_dicom, finish_pixels, pixels_digest

        pixels = finish_pixels(src.dataset, src.pixels, pixels, scale)  # BitsStored clip, pixel padding
        dataset = derive_dicom(
            src.dataset, pixels, scale, model_id, weights_sha256=weights_sha256, syntax=dicom_syntax,
            provenance=provenance,
        )
        meta["dicom_syntax"] = dataset._medsr_syntax
        meta["dicom_pixels_digest"] = pixels_digest(pixels)
    return Image(
        pixels=pixels,
        format=src.format,
        max_value=src.max_value,
        photometric=src.photometric,
        path=None,
        dataset=dataset,
        meta=meta,
    )


def write_image(img: Image, path: str | os.PathLike[str]) -> Path:
    """Write ``img`` in its own format (``img.format``; the suffix of ``path`` must agree) atomically:
    a temporary file in the destination directory, then ``os.replace``. Returns the path.

    Raises :class:`ImageWriteError`; on failure no partial file remains and an existing destination
    is left untouched.
    """
    from medsr.fsutil import atomic_write_path, os_error_reason

    dest = Path(path)
    if img.format not in DEFAULT_SUFFIX:
        raise ImageWriteError(f"{dest}: unknown image format {img.format!r}")
    if not _suffix_agrees(img.format, dest.suffix):
        raise ImageWriteError(
            f"{dest}: suffix {dest.suffix!r} does not match the image format {img.format!r} "
            f"(use {DEFAULT_SUFFIX[img.format]!r})"
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(dest) as tmp:
            if img.format == "dicom":
                from medsr.io.dicom_derive import write_dicom

                write_dicom(img, tmp)
            else:
                from medsr.io.raster import write_raster

                write_raster(img, tmp)
    except ImageWriteError as e:
        raise ImageWriteError(f"{dest}: {e}") from None
    except OSError as e:
        raise ImageWriteError(f"{dest}: cannot write ({os_error_reason(e, dest.parent)})") from None
    except Exception as e:  # encoder errors; DICOM messages could quote attribute values: type only
        detail = type(e).__name__ if img.format == "dicom" else f"{type(e).__name__}: {e}"
        raise ImageWriteError(f"{dest}: cannot encode {img.format} ({detail})") from None
    log.debug("wrote %s: %s %s %s", dest, img.format, tuple(img.pixels.shape), img.dtype)
    return dest
