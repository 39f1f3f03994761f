"""PNG / JPEG (OpenCV) and TIFF (tifffile) reading and writing, 8- and 16-bit, gray and RGB.

Colour is RGB in memory (OpenCV's BGR is converted at the boundary). Alpha is dropped (logged
once per file, ``meta["alpha_dropped"] = True``): output is gray or RGB without alpha.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medsr.io.base import Image, ImageReadError, ImageWriteError

log = logging.getLogger("medsr.io")

JPEG_QUALITY = 95
_PNG_COLOR_TYPES = {0: "gray", 2: "rgb", 3: "palette", 4: "gray+alpha", 6: "rgba"}


def read_raster(path: Path, fmt: str) -> Image:
    if fmt == "tiff":
        return _read_tiff(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    return _read_png(path, data) if fmt == "png" else _read_jpeg(path, data)


def _decode(path: Path, data: bytes, flags: int, what: str) -> np.ndarray:
    import cv2

    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        arr = None
    if arr is None or arr.size == 0:
        raise ImageReadError(f"{path}: not a valid {what} file (cannot be decoded; corrupt or truncated)")
    return arr


def _bgr_to_rgb(arr: np.ndarray, path: Path, meta: dict) -> np.ndarray:
    import cv2

    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        log.warning("%s: alpha channel dropped (output has no alpha)", path)
        meta["alpha_dropped"] = True
        arr = arr[:, :, :3]
    if arr.ndim == 3:
        return np.ascontiguousarray(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB))
    return arr


def _read_png(path: Path, data: bytes) -> Image:
    import cv2

    from medsr.io.checks import check_png

    check_png(path, data)  # every chunk inside the file with its CRC, IHDR valid, IEND present
    bit_depth, color_type = data[24], data[25]
    arr = _decode(path, data, cv2.IMREAD_UNCHANGED, "PNG")
    meta: dict = {"png_bit_depth": int(bit_depth), "png_color_type": _PNG_COLOR_TYPES.get(color_type, "?")}
    if color_type == 4 and arr.ndim == 3:  # gray + alpha: OpenCV expands to BGRA; keep it gray
        log.warning("%s: alpha channel dropped (output has no alpha)", path)
        meta["alpha_dropped"] = True
        arr = np.ascontiguousarray(arr[:, :, 0])
    arr = _bgr_to_rgb(arr, path, meta)
    return _finish(path, "png", arr, meta)


def _read_jpeg(path: Path, data: bytes) -> Image:
    import cv2

    from medsr.io.checks import check_jpeg

    # every marker segment inside the file, a valid frame header, scan data up to an end-of-image marker (an
    # EXIF thumbnail sits inside its APP1 segment); bytes after the EOI (camera trailers, padding) are ignored
    check_jpeg(path, data)
    # ANYCOLOR|ANYDEPTH: gray stays gray, EXIF orientation is applied (no EXIF is written back)
    arr = _decode(path, data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH, "JPEG")
    meta: dict = {"jpeg_quality": JPEG_QUALITY}
    arr = _bgr_to_rgb(arr, path, meta)
    return _finish(path, "jpeg", arr, meta)


def _read_tiff(path: Path) -> Image:
    import tifffile

    from medsr.io.checks import check_tiff_page

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
            # geometry and every strip/tile extent before decoding: tifffile fills missing data with zeros
            check_tiff_page(path, page, tf.filehandle.size)
            npages = len(tf.pages)
            photometric = int(page.photometric)
            compression = int(page.compression)
            axes = page.axes
            arr = page.asarray()
            resolution = None
            try:
                xres, yres = page.get_resolution()
                if xres and yres:
                    resolution = (float(xres), float(yres))
                    unit = int(page.resolutionunit)
                else:
                    unit = None
            except Exception:  # resolution tags are optional
                resolution, unit = None, None
    except ImageReadError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise ImageReadError(f"{path}: corrupt or truncated TIFF file ({type(e).__name__}: {e})") from None
    if npages > 1:
        log.warning("%s: TIFF has %d pages; only the first is read", path, npages)
    # TIFF photometric: 0 min-is-white, 1 min-is-black, 2 RGB, 3 palette, 5 CMYK, 6 YCbCr
    if photometric not in (0, 1, 2, 6):
        raise ImageReadError(
            f"{path}: unsupported TIFF photometric interpretation {photometric} (palette/CMYK/...)"
        )
    if "S" in axes and axes.index("S") < axes.index("Y"):  # planar configuration: samples first
        arr = np.moveaxis(arr, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    # drop singleton axes other than Y/X (a 1x1 image keeps its two axes), then a single sample
    arr = arr.reshape([n for n, a in zip(arr.shape, axes, strict=True) if a in "YX" or n != 1])
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        log.warning("%s: alpha (extra sample) dropped (output has no alpha)", path)
        arr = arr[:, :, :3]
        alpha = True
    else:
        alpha = False
    if arr.ndim == 3 and arr.shape[2] == 2:  # gray + alpha
        log.warning("%s: alpha (extra sample) dropped (output has no alpha)", path)
        arr = arr[:, :, 0]
        alpha = True
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ImageReadError(
            f"{path}: unsupported TIFF layout {arr.shape} (axes {axes}); expected gray or RGB"
        )
    meta: dict = {"tiff_compression": compression, "tiff_photometric": photometric}
    if alpha:
        meta["alpha_dropped"] = True
    if resolution is not None:
        meta["tiff_resolution"] = resolution
        meta["tiff_resolution_unit"] = unit
    img = _finish(path, "tiff", np.ascontiguousarray(arr), meta)
    if photometric == 0 and img.channels == 1:
        img.photometric = "MONOCHROME1"
    return img


def _finish(path: Path, fmt: str, arr: np.ndarray, meta: dict) -> Image:
    if arr.dtype == np.uint8:
        max_value = 255
    elif arr.dtype == np.uint16:
        max_value = 65535
    else:
        raise ImageReadError(
            f"{path}: unsupported {fmt.upper()} sample type {arr.dtype} (need 8- or 16-bit unsigned)"
        )
    if arr.ndim == 3 and arr.shape[2] not in (3,):
        raise ImageReadError(f"{path}: unsupported {fmt.upper()} layout with {arr.shape[2]} channels")
    meta["bits_stored"] = arr.dtype.itemsize * 8
    return Image(
        pixels=arr,
        format=fmt,
        max_value=max_value,
        photometric="RGB" if arr.ndim == 3 else "MONOCHROME2",
        path=path,
        meta=meta,
    )


def write_raster(img: Image, tmp: Path) -> None:
    """Write ``img`` to ``tmp`` (whose suffix already agrees with ``img.format``)."""
    arr = img.pixels
    if arr.dtype not in (np.uint8, np.uint16):
        raise ImageWriteError(f"{img.format.upper()} output needs uint8 or uint16 pixels, not {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] != 3:
        raise ImageWriteError(f"{img.format.upper()} output needs 1 or 3 channels, not {arr.shape[2]}")
    if img.format == "tiff":
        _write_tiff(img, arr, tmp)
        return
    import cv2

    if img.format == "jpeg":
        if arr.dtype != np.uint8:
            raise ImageWriteError("JPEG output is 8-bit only; write 16-bit data as PNG or TIFF")
        params = [cv2.IMWRITE_JPEG_QUALITY, int(img.meta.get("jpeg_quality", JPEG_QUALITY))]
    elif img.format == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    else:
        raise ImageWriteError(f"not a raster format: {img.format!r}")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    # streamed to the file by libpng / libjpeg (OpenCV picks the codec from tmp's suffix, which agrees with
    # the format): no encoded copy of a 100+ MB output in memory. OpenCV reports a failed write (a full
    # disk) only as False: an OSError without errno, which os_error_reason names "No space left on device".
    try:
        if _utf8(tmp):
            ok = cv2.imwrite(str(tmp), np.ascontiguousarray(arr), params)
        else:  # OpenCV takes names as UTF-8: a folder named in other bytes gets the encoded file from Python
            ok, buf = cv2.imencode(tmp.suffix, np.ascontiguousarray(arr), params)
            if ok:
                tmp.write_bytes(buf.tobytes())
    except cv2.error as e:
        raise OSError(f"OpenCV could not write {img.format.upper()}") from e
    if not ok:
        raise OSError(f"OpenCV could not write {img.format.upper()}")
    prov = img.meta.get("provenance")
    if prov:  # what made this image, in the file itself (medsr.io.provenance)
        from medsr.io.provenance import embed_jpeg, embed_png, format_provenance

        if img.format == "png":
            embed_png(tmp, format_provenance(prov), f"medsr {prov.get('version', '')}".strip())
        else:
            embed_jpeg(tmp, format_provenance(prov))


def _utf8(path: Path) -> bool:
    """True if ``path`` is valid UTF-8 (not surrogate-escaped bytes), so that C libraries can open it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write_tiff(img: Image, arr: np.ndarray, tmp: Path) -> None:
    import tifffile

    if arr.ndim == 3:
        photometric = "rgb"
    else:
        photometric = "miniswhite" if img.photometric == "MONOCHROME1" else "minisblack"
    kwargs: dict = {}
    res = img.meta.get("tiff_resolution")
    if res is not None:
        kwargs["resolution"] = (float(res[0]), float(res[1]))
        unit = img.meta.get("tiff_resolution_unit")
        if unit:
            kwargs["resolutionunit"] = int(unit)
    # lossless always: uncompressed sources stay uncompressed, anything else becomes zlib/deflate
    compression = None if int(img.meta.get("tiff_compression", 1)) == 1 else "zlib"
    prov = img.meta.get("provenance")
    if prov:  # what made this image: ImageDescription + Software tags (medsr.io.provenance)
        from medsr.io.provenance import format_provenance

        kwargs.update(description=format_provenance(prov), software=f"medsr {prov.get('version', '')}".strip(),
                      metadata=None)
    tifffile.imwrite(tmp, arr, photometric=photometric, compression=compression, **kwargs)
