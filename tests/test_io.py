"""Raster I/O (PNG/JPEG/TIFF), normalisation, dispatch, errors and atomic writes. Synthetic data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from medsr.fsutil import atomic_write_path
from medsr.io import (
    SUPPORTED_SUFFIXES,
    Image,
    ImageReadError,
    ImageWriteError,
    float_to_stored,
    is_supported,
    make_output,
    output_suffix,
    read_image,
    to_float,
    write_image,
)


def _pixels(rng: np.random.Generator, dtype: type, rgb: bool, h: int = 23, w: int = 31) -> np.ndarray:
    shape = (h, w, 3) if rgb else (h, w)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype)


def _image(pixels: np.ndarray, fmt: str) -> Image:
    return Image(
        pixels=pixels,
        format=fmt,
        max_value=int(np.iinfo(pixels.dtype).max),
        photometric="RGB" if pixels.ndim == 3 else "MONOCHROME2",
    )


@pytest.mark.parametrize("fmt,suffix", [("png", ".png"), ("tiff", ".tif"), ("tiff", ".tiff")])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("rgb", [False, True])
def test_lossless_round_trip(tmp_path, rng, fmt, suffix, dtype, rgb):
    px = _pixels(rng, dtype, rgb)
    out = write_image(_image(px, fmt), tmp_path / f"a{suffix}")
    img = read_image(out)
    assert img.format == fmt
    assert img.dtype == dtype  # 16-bit stays 16-bit
    assert img.max_value == np.iinfo(dtype).max
    assert img.photometric == ("RGB" if rgb else "MONOCHROME2")
    np.testing.assert_array_equal(img.pixels, px)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left


def test_png_bit_depth_meta_and_rgb_order(tmp_path):
    import cv2

    bgr = np.zeros((4, 5, 3), np.uint16)
    bgr[..., 2] = 60000  # red in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "r.png"), bgr)
    img = read_image(tmp_path / "r.png")
    assert img.meta["png_bit_depth"] == 16 and img.dtype == np.uint16
    assert (img.pixels[..., 0] == 60000).all() and (img.pixels[..., 1:] == 0).all()


def test_12bit_in_16bit_png_keeps_65535_scale(tmp_path, rng):
    px = rng.integers(0, 4095, size=(8, 8), dtype=np.uint16)
    img = read_image(write_image(_image(px, "png"), tmp_path / "a.png"))
    assert img.max_value == 65535 and img.dtype == np.uint16
    np.testing.assert_array_equal(img.pixels, px)


def test_jpeg_read_write(tmp_path, rng):
    import cv2

    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    cv2.imwrite(str(tmp_path / "g.jpg"), gray, [cv2.IMWRITE_JPEG_QUALITY, 100])
    img = read_image(tmp_path / "g.jpg")
    assert img.format == "jpeg" and img.dtype == np.uint8 and img.pixels.ndim == 2
    assert np.abs(img.pixels.astype(int) - gray).max() <= 3
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200  # red
    out = write_image(_image(rgb, "jpeg"), tmp_path / "c.jpeg")
    back = read_image(out)
    assert back.photometric == "RGB" and back.pixels[..., 0].mean() > 180 and back.pixels[..., 2].mean() < 20
    with pytest.raises(ImageWriteError, match="8-bit"):
        write_image(_image(rng.integers(0, 65535, (4, 4), dtype=np.uint16), "jpeg"), tmp_path / "x.jpg")
    assert not (tmp_path / "x.jpg").exists()


def test_alpha_dropped(tmp_path, caplog):
    import cv2

    bgra = np.full((6, 7, 4), 10, np.uint8)
    bgra[..., 0] = 50  # blue
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    with caplog.at_level(logging.WARNING, logger="medsr.io"):
        img = read_image(tmp_path / "a.png")
    assert img.pixels.shape == (6, 7, 3) and img.meta["alpha_dropped"]
    assert (img.pixels[..., 2] == 50).all()  # blue is last in RGB
    assert "alpha" in caplog.text
    ga = np.zeros((5, 5, 2), np.uint8)  # gray + alpha TIFF
    import tifffile

    tifffile.imwrite(tmp_path / "ga.tif", ga, photometric="minisblack", extrasamples=["unassalpha"])
    assert read_image(tmp_path / "ga.tif").pixels.shape == (5, 5)


def test_tiff_miniswhite_is_monochrome1_and_resolution_scaled(tmp_path, rng):
    import tifffile

    px = _pixels(rng, np.uint16, False)
    tifffile.imwrite(tmp_path / "w.tif", px, photometric="miniswhite", resolution=(100.0, 100.0))
    img = read_image(tmp_path / "w.tif")
    assert img.photometric == "MONOCHROME1"
    f = to_float(img)
    np.testing.assert_allclose(f[..., 0], 1.0 - px / 65535.0, atol=1e-6)
    up = np.repeat(np.repeat(img.pixels, 2, 0), 2, 1)
    out = make_output(img, up, 2, "m")
    back = read_image(write_image(out, tmp_path / "o.tif"))
    assert back.photometric == "MONOCHROME1" and back.dtype == np.uint16
    np.testing.assert_array_equal(back.pixels, up)
    assert back.meta["tiff_resolution"] == pytest.approx((200.0, 200.0))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1", "RGB"])
def test_float_round_trip_exact_and_stripwise(rng, dtype, photometric):
    px = _pixels(rng, dtype, photometric == "RGB", h=37)
    img = Image(px, "png", int(np.iinfo(dtype).max), photometric)
    f = to_float(img)
    assert f.dtype == np.float32 and f.ndim == 3 and f.shape[2] == (3 if photometric == "RGB" else 1)
    assert f.min() >= 0.0 and f.max() <= 1.0
    np.testing.assert_array_equal(float_to_stored(f, img), px)
    out = np.empty_like(px)
    for y in range(0, px.shape[0], 8):  # strip-wise into a preallocated array, as the runtime does
        out[y : y + 8] = float_to_stored(f[y : y + 8], img)
    np.testing.assert_array_equal(out, px)


def test_float_to_stored_clips(rng):
    img = Image(np.zeros((2, 2), np.uint16), "png", 65535)
    s = float_to_stored(np.array([[[-0.5], [1.5]]], np.float32), img)
    assert s.dtype == np.uint16 and s.tolist() == [[0, 65535]]


def test_make_output_checks_shape_and_dtype(rng):
    img = _image(_pixels(rng, np.uint8, False, 4, 4), "png")
    with pytest.raises(ValueError):
        make_output(img, np.zeros((8, 8), np.uint16), 2, "m")
    with pytest.raises(ValueError):
        make_output(img, np.zeros((8, 9), np.uint8), 2, "m")
    out = make_output(img, np.zeros((8, 8), np.uint8), 2, "m")
    assert out.format == "png" and out.max_value == 255


def test_suffixes():
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"} <= SUPPORTED_SUFFIXES
    assert is_supported("a.PNG") and is_supported("dir/IM0001") and is_supported("x.dcm")
    assert not is_supported("a.gif")
    img = _image(np.zeros((2, 2), np.uint8), "tiff")
    assert output_suffix(img, "in.tiff") == ".tiff" and output_suffix(img, "in.png") == ".tif"


def test_content_wins_over_suffix(tmp_path, rng, caplog):
    px = _pixels(rng, np.uint8, False)
    src = write_image(_image(px, "png"), tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(src.read_bytes())
    img = read_image(tmp_path / "b.jpg")
    assert img.format == "png"
    np.testing.assert_array_equal(img.pixels, px)


# ------------------------------------------------------------------------------------------ errors


def _assert_read_error(path: Path, match: str) -> None:
    with pytest.raises(ImageReadError) as ei:
        read_image(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert match.lower() in msg.lower(), msg


def test_truncated_png(tmp_path, rng):
    src = write_image(_image(_pixels(rng, np.uint8, True, 64, 64), "png"), tmp_path / "a.png")
    bad = tmp_path / "trunc.png"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    _assert_read_error(bad, "truncated")


def test_truncated_jpeg(tmp_path, rng):
    src = write_image(_image(_pixels(rng, np.uint8, True, 64, 64), "jpeg"), tmp_path / "a.jpg")
    bad = tmp_path / "trunc.jpg"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    _assert_read_error(bad, "truncated")


def test_random_bytes_png(tmp_path, rng):
    bad = tmp_path / "noise.png"
    bad.write_bytes(rng.bytes(3000))
    _assert_read_error(bad, "not a valid PNG")


def test_corrupt_png_body(tmp_path, rng):
    src = write_image(_image(_pixels(rng, np.uint8, False, 64, 64), "png"), tmp_path / "a.png")
    data = bytearray(src.read_bytes())
    data[40:-20] = rng.bytes(len(data) - 60)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(bytes(data))
    _assert_read_error(bad, "PNG")


def test_unsupported_suffix_missing_empty_dir(tmp_path):
    gif = tmp_path / "a.gif"
    gif.write_bytes(b"GIF89a" + b"\0" * 200)
    _assert_read_error(gif, "unsupported file type")
    _assert_read_error(tmp_path / "missing.png", "not found")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _assert_read_error(empty, "empty")
    _assert_read_error(tmp_path, "directory")


def test_write_suffix_mismatch(tmp_path):
    with pytest.raises(ImageWriteError, match="suffix"):
        write_image(_image(np.zeros((2, 2), np.uint8), "png"), tmp_path / "a.jpg")
    assert list(tmp_path.iterdir()) == []


def test_write_failure_leaves_destination_untouched(tmp_path, monkeypatch):
    import medsr.io.raster as raster

    dest = tmp_path / "out.png"
    dest.write_bytes(b"old")

    def boom(img, tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(raster, "write_raster", boom)
    with pytest.raises(ImageWriteError, match="No space left"):
        write_image(_image(np.zeros((2, 2), np.uint8), "png"), dest)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_atomic_write_path(tmp_path):
    dest = tmp_path / "x.tif"
    with atomic_write_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".tif" and tmp != dest
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new"
    with pytest.raises(KeyboardInterrupt), atomic_write_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert dest.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["x.tif"]
