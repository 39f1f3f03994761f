"""Hostile inputs and faults against medsr-infer and the API, one group per class of issue 11.

Every case is generated here (small, deterministic). Decompression bombs and signals run the real
CLI in a subprocess so that its exit code, messages and peak memory are what a user would see.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner
from conftest import make_cr, tiny_rrdb
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medsr.api import Upscaler
from medsr.cli.infer import main
from medsr.fsutil import atomic_write_path, remove_stale_temps
from medsr.io import ImageReadError, ImageTooLargeError, read_image

BIG = 20000


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny_x4.pth"
    torch.save({"params_ema": tiny_rrdb(4, 1).state_dict()}, p)
    return p


def _cli(*args: str):
    return CliRunner().invoke(main, ["--quiet", "--device", "cpu", "--tile", "16", "--overlap", "4", *args])


def _sub(model: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "medsr.cli.infer", "--quiet", "--device", "cpu", "--model", str(model), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _png(path: Path, shape: tuple[int, ...] = (16, 16), value: int = 100) -> Path:
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


# ---------------------------------------------------------------- 1. bombs and huge images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path) -> Path:
    """A ~400 KB PNG that decodes to 20000 x 20000 8-bit gray (400 MB)."""
    c = zlib.compressobj(9)
    row = b"\x00" * (BIG + 1)
    body = b"".join(c.compress(row) for _ in range(BIG)) + c.flush()
    ihdr = struct.pack(">IIBBBBB", BIG, BIG, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))
    return path


def jpeg_bomb(path: Path) -> Path:
    """A small real JPEG whose frame header claims 30000 x 30000."""
    ok, buf = cv2.imencode(".jpg", np.full((16, 16), 90, np.uint8))
    data = bytearray(buf.tobytes())
    i = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, 30000, 30000)
    path.write_bytes(bytes(data))
    return path


def tiff_bomb(path: Path) -> Path:
    """A deflate TIFF whose 20000 strips all point at one compressed row of zeros."""
    row = zlib.compress(b"\x00" * BIG, 9)
    n_tags = 10
    ifd_at = 8
    data_at = ifd_at + 2 + n_tags * 12 + 4
    offs_at = data_at + len(row)
    counts_at = offs_at + 4 * BIG
    tags = [(256, 4, 1, BIG), (257, 4, 1, BIG), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
            (273, 4, BIG, offs_at), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, BIG, counts_at), (284, 3, 1, 1)]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", n_tags))
    for tag, typ, count, value in tags:
        out += struct.pack("<HHII", tag, typ, count, value) if typ == 4 else struct.pack("<HHIHH", tag, typ, count, value, 0)
    out += struct.pack("<I", 0) + row + struct.pack(f"<{BIG}I", *([data_at] * BIG)) + struct.pack(f"<{BIG}I", *([len(row)] * BIG))
    path.write_bytes(bytes(out))
    return path


def deflated_dicom_bomb(path: Path) -> Path:
    """A deflated DICOM of 20000 x 20000 x 16 bit (800 MB of pixels) in well under 1 MB."""
    ds = make_cr(h=4, w=4)
    ds.Rows = ds.Columns = BIG
    del ds.PixelData
    small = path.with_suffix(".hdr.dcm")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(small, enforce_file_format=True)
    raw = small.read_bytes()
    meta_end = 132 + 12 + struct.unpack("<I", raw[140:144])[0]
    small.unlink()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
    from io import BytesIO

    bio = BytesIO()
    pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(bio), meta, enforce_standard=True)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    n = BIG * BIG * 2
    body = c.compress(raw[meta_end:]) + c.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n))
    zero = b"\x00" * (1 << 22)
    for _ in range(n // len(zero)):
        body += c.compress(zero)
    body += c.flush()
    path.write_bytes(b"\x00" * 128 + b"DICM" + bio.getvalue() + body)
    return path


def test_bombs_are_refused_from_the_header_in_bounded_memory(tmp_path: Path, model_path: Path) -> None:
    d = tmp_path / "bombs"
    d.mkdir()
    files = [png_bomb(d / "a.png"), jpeg_bomb(d / "b.jpg"), tiff_bomb(d / "c.tif"), deflated_dicom_bomb(d / "d.dcm")]
    assert max(f.stat().st_size for f in files) < 2_000_000
    import psutil

    cmd = [sys.executable, "-m", "medsr.cli.infer", "--quiet", "--device", "cpu", "--model", str(model_path),
           str(d), "-o", str(tmp_path / "out")]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None and time.monotonic() - t0 < 600:  # ends when the run does
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.005)
    out, err = p.communicate(timeout=600)
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    dt = time.monotonic() - t0
    peak_mb = peak / 2**20
    assert r.returncode == 1, r.stderr
    assert "0 written" in r.stderr and "4 failed" in r.stderr  # the summary goes to stderr with the failures
    for f, size in zip(files[:3], ("20000x20000", "30000x30000", "20000x20000"), strict=True):
        assert f"{f}: image is {size}" in r.stderr and "above the limit of 50 MP" in r.stderr
    assert f"{files[3]}: deflated DICOM inflates to more than" in r.stderr
    assert "Traceback" not in r.stderr
    assert 0 < peak_mb < 600, f"peak RSS {peak_mb:.0f} MB"  # measured: ~250 MB, most of it torch itself
    print(f"bombs refused in {dt:.1f} s (no time limit asserted: a busy machine may take long)")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.*"))


def test_pixel_limit_is_configurable_and_names_the_file(tmp_path: Path, model_path: Path) -> None:
    src = _png(tmp_path / "scan.png", (40, 50))
    with pytest.raises(ImageTooLargeError, match=r"scan.png: image is 50x40 \(0.0 MP\), above the limit of 0.001 MP"):
        read_image(src, max_pixels=1000)
    assert read_image(src, max_pixels=2000).width == 50
    r = _cli("--model", str(model_path), "--max-pixels", "1000", str(src), "-o", str(tmp_path / "o"))
    assert r.exit_code == 1 and "above the limit" in r.output
    up = Upscaler.from_pretrained(model_path, device="cpu", tile=16, overlap=4)
    with pytest.raises(ImageTooLargeError):
        up.upscale_file(src, tmp_path / "o2.png", max_pixels=1000)


# ---------------------------------------------------------------- 2. special files


def test_fifo_and_devices_are_refused_without_hanging(tmp_path: Path, model_path: Path) -> None:
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    r = _sub(model_path, str(fifo), "/dev/zero", "/dev/urandom", "-o", str(tmp_path / "out"), timeout=600)
    assert r.returncode == 1
    assert f"{fifo}: is a FIFO (named pipe), not a regular file" in r.stderr
    assert "/dev/zero: is a character device" in r.stderr and "/dev/urandom: is a character device" in r.stderr
    # met while walking a folder: reported as ignored, the rest of the folder runs
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "pipe.png")
    _png(d / "ok.png")
    r = _cli("--model", str(model_path), str(d), "-o", str(tmp_path / "o2"))
    assert r.exit_code == 0 and "1 written" in r.output and "ignored (not a regular file)" in r.output


# ---------------------------------------------------------------- 3. interrupted writes


def test_stale_temps_are_removed_and_live_ones_kept(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".a.png.medsr-{dead.pid}-0badf00d.tmp.png"
    live = out / f".b.png.medsr-{os.getppid()}-0badf00d.tmp.png"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    assert remove_stale_temps(out) == [stale] and live.exists()
    stale.write_bytes(b"partial")
    r = _cli("--model", str(model_path), str(_png(tmp_path / "a.png")), "-o", str(out))
    assert r.exit_code == 0 and "removed stale temporary file" in r.output
    assert not stale.exists() and live.exists() and (out / "a.png").is_file()


def test_temp_names_fit_a_long_file_name(tmp_path: Path) -> None:
    dest = tmp_path / ("x" * 246 + ".png")  # 250 bytes: legal
    with atomic_write_path(dest) as tmp:
        assert len(tmp.name.encode()) <= 255
        cv2.imwrite(str(tmp), np.zeros((2, 2), np.uint8))
    assert dest.is_file() and not _temps(tmp_path)
    dest2 = tmp_path / ("é" * 125 + ".png")  # multi-byte names are measured in bytes
    with atomic_write_path(dest2) as tmp:
        assert len(tmp.name.encode()) <= 255
        tmp.write_bytes(b"x")
    assert dest2.is_file()


def test_sigterm_mid_batch_stops_cleanly(tmp_path: Path, model_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(60):
        _png(src / f"{i:03d}.png", (96, 96), i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medsr.cli.infer", "--quiet", "--device", "cpu", "--model", str(model_path),
           "--tile", "32", "--overlap", "8", str(src), "-o", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # generous: a busy machine loads the model slowly; the loop ends on the file
    while time.monotonic() < deadline and p.poll() is None and not (out.is_dir() and any(out.glob("[!.]*.png"))):
        time.sleep(0.02)  # a finished output, not the hidden temp file being streamed
    assert p.poll() is None, f"the run ended before it could be interrupted: {p.communicate()[1][-2000:]}"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=600)
    written = sorted(out.glob("[!.]*.png"))
    assert p.returncode == 130, err
    assert "interrupted (signal 15)" in err and "Traceback" not in err
    assert 0 < len(written) < 60 and not _temps(out)
    for f in written:  # every output that exists is complete
        assert cv2.imread(str(f), cv2.IMREAD_UNCHANGED).shape == (384, 384)
    r = _sub(model_path, "--tile", "32", "--overlap", "8", str(src), "-o", str(out))  # a re-run finishes the job
    assert r.returncode == 0 and f"{60 - len(written)} written, {len(written)} skipped" in r.stderr


# ---------------------------------------------------------------- 4. output collisions


def test_collisions_are_reported_not_dropped(tmp_path: Path, model_path: Path) -> None:
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        _png(tmp_path / d / "a.png")
    r = _cli("--model", str(model_path), str(tmp_path / "d1" / "a.png"), str(tmp_path / "d2" / "a.png"), "-o", str(tmp_path / "o"))
    assert r.exit_code == 1 and "2 failed" in r.output and "output collision" in r.output
    assert not (tmp_path / "o" / "a.png").exists()
    for top in ("x", "y"):
        (tmp_path / top / "scans").mkdir(parents=True)
        _png(tmp_path / top / "scans" / "s.png")
    r = _cli("--model", str(model_path), str(tmp_path / "x" / "scans"), str(tmp_path / "y" / "scans"), "-o", str(tmp_path / "o2"))
    assert r.exit_code == 1 and "output collision" in r.output and "0 written" in r.output
    case = tmp_path / "case"
    case.mkdir()
    _png(case / "a.png")
    _png(case / "a.PNG")
    _png(case / "b.png")
    r = _cli("--model", str(model_path), str(case), "-o", str(tmp_path / "o3"), "--overwrite")
    assert r.exit_code == 1 and "1 written" in r.output and "2 failed" in r.output


# ---------------------------------------------------------------- 5./6. output inside the input, symlinks


def test_output_tree_inside_the_input_is_not_walked(tmp_path: Path, model_path: Path) -> None:
    d = tmp_path / "scans"
    d.mkdir()
    _png(d / "a.png")
    for _ in range(2):
        r = _cli("--model", str(model_path), str(d), "-o", str(d / "out"))
        assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*.png")) == ["a.png", "out/a.png"]
    assert "0 written, 1 skipped" in r.output


def test_symlinks_followed_loops_walked_once_dangling_reported(tmp_path: Path, model_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    _png(real / "r.png")
    d = tmp_path / "d"
    d.mkdir()
    _png(d / "a.png")
    (d / "linked").symlink_to(real, target_is_directory=True)
    (d / "loop").symlink_to(d, target_is_directory=True)
    (d / "gone.png").symlink_to(tmp_path / "nowhere.png")
    r = _cli("--model", str(model_path), str(d), "-o", str(tmp_path / "o"))
    assert r.exit_code == 1
    assert (tmp_path / "o" / "a.png").is_file() and (tmp_path / "o" / "linked" / "r.png").is_file()
    assert "2 written" in r.output and "dangling symbolic link" in r.output and "already walked" in r.output


# ---------------------------------------------------------------- 7. the API never clips silently


def test_api_rejects_out_of_range_floats(model_path: Path) -> None:
    up = Upscaler.from_pretrained(model_path, device="cpu", tile=16, overlap=4)
    with pytest.raises(ValueError, match=r"\[0, 255\].*x / 255"):
        up(np.linspace(0, 255, 64, dtype=np.float32).reshape(8, 8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        up(np.full((8, 8), np.nan, np.float32))
    assert up(np.full((8, 8), 0.5, np.float32)).shape == (32, 32)


# ---------------------------------------------------------------- 8. honest messages


def _save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_problems_are_named(tmp_path: Path) -> None:
    ds = make_cr()
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(ImageReadError, match="pixel data is 1280 bytes, expected 640 for 20x16x1 at 16 bits: Rows/Columns"):
        read_image(_save(ds, tmp_path / "double.dcm"))
    full = _save(make_cr(), tmp_path / "full.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(full[: len(full) - 300])  # the pixel element runs past the end
    with pytest.raises(ImageReadError) as ei:
        read_image(tmp_path / "cut.dcm")
    assert "truncated" in str(ei.value) and "no pixel data (not an image" not in str(ei.value)
    native = _save(make_cr(), tmp_path / "native.dcm").read_bytes()
    assert native.count(b"1.2.840.10008.1.2.1\x00") == 1  # claim RLE Lossless for native bytes
    (tmp_path / "mismatch.dcm").write_bytes(native.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00"))
    with pytest.raises(ImageReadError, match="RLE Lossless pixel data must be encapsulated.*not in that transfer syntax"):
        read_image(tmp_path / "mismatch.dcm")


# ---------------------------------------------------------------- 9. valid inputs accepted


def test_jpeg_with_trailer_and_1x1_tiff_are_read(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".jpg", np.full((8, 8), 77, np.uint8))
    (tmp_path / "t.jpg").write_bytes(buf.tobytes() + b"\x00" * 10000 + b"camera trailer")
    assert read_image(tmp_path / "t.jpg").width == 8
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[:-40])
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        read_image(tmp_path / "cut.jpg")
    import tifffile

    tifffile.imwrite(tmp_path / "one.tif", np.array([[1234]], np.uint16))
    img = read_image(tmp_path / "one.tif")
    assert (img.height, img.width, img.channels) == (1, 1, 1) and int(img.pixels[0, 0]) == 1234


def _can_mount_tmpfs() -> str | None:
    import shutil

    if shutil.which("unshare") is None:
        return "unshare not installed"
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a mount namespace ({r.stderr.decode().strip()})"


@pytest.mark.parametrize("fmt", ["tiff", "dicom", "png"])
def test_full_disk_is_named_for_every_format(tmp_path: Path, model_path: Path, fmt: str) -> None:
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    if fmt == "dicom":
        ds = make_cr(h=128, w=128)
        src = _save(ds, tmp_path / "in.dcm")
    elif fmt == "tiff":
        import tifffile

        src = tmp_path / "in.tif"
        tifffile.imwrite(src, np.random.default_rng(0).integers(0, 65535, (128, 128), dtype=np.uint16))
    else:
        src = tmp_path / "in.png"
        cv2.imwrite(str(src), np.random.default_rng(0).integers(0, 65535, (128, 128), dtype=np.uint16))
    out = tmp_path / "full"
    out.mkdir()
    # a 64 KiB file system, private to this command: the 512x512 16-bit output cannot fit
    infer = [sys.executable, "-m", "medsr.cli.infer", "--quiet", "--device", "cpu", "--model", str(model_path),
             "--tile", "64", "--overlap", "8", str(src), "-o", str(out)]
    script = f'mount -t tmpfs -o size=64k tmpfs "{out}" && exec "$@"'
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *infer], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert "(OSError)" not in r.stderr and "requested and" not in r.stderr


def test_nan_weights_are_refused_at_load(tmp_path: Path) -> None:
    from medsr.weights import WeightsError, load_model

    sd = tiny_rrdb(4, 1).state_dict()
    sd["conv_first.weight"][0, 0, 0, 0] = float("nan")
    p = tmp_path / "broken.pth"
    torch.save({"params_ema": sd}, p)
    with pytest.raises(WeightsError, match=r"broken\.pth: the weights are broken: 1 tensor\(s\) hold NaN/Inf \(first: conv_first\.weight\)"):
        load_model(str(p))
    r = _cli("--model", str(p), str(_png(tmp_path / "a.png")), "-o", str(tmp_path / "o"))
    assert r.exit_code != 0 and "the weights are broken" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- issue 23: lengths, geometry, options, names
# (tests/test_hostile_sweep.py cuts and flips every format and transfer syntax; these pin one case per class)


def _tiff_tag_offset(path: Path, tag: str) -> tuple[int, int]:
    """(file offset of the tag's value, bytes per item) in a little-endian TIFF."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        t = tf.pages[0].tags[tag]
        return t.valueoffset, 2 if t.dtype == 3 else 4


def _patch(path: Path, out: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    out.write_bytes(bytes(data))
    return out


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(ImageReadError) as ei:
        read_image(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_declared_lengths_are_checked_against_the_bytes_present(tmp_path: Path, model_path: Path) -> None:
    import tifffile
    from pydicom.uid import RLELossless

    # DICOM: a Pixel Data length of 0xFFFFFFF0 with the 8 KB of a 64x64x16 image present
    good = _save(make_cr(h=64, w=64), tmp_path / "good.dcm")
    at = good.read_bytes().rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    big = _patch(good, tmp_path / "biglen.dcm", at + 8, "<I", 0xFFFFFFF0)
    _refused(big, "truncated DICOM file (pixel data at offset", "declares 4294967280 bytes, only 8192 present")
    # DICOM encapsulated: a fragment whose item length runs past the pixel data
    ds = make_cr(h=32, w=32)
    ds.compress(RLELossless, generate_instance_uid=False)
    rle = _save(ds, tmp_path / "rle.dcm")
    item = rle.read_bytes().find(b"\xfe\xff\x00\xe0", at - 200 if at > 200 else 0)
    item = rle.read_bytes().find(b"\xfe\xff\x00\xe0", item + 8)  # the first fragment (after the offset table)
    _refused(_patch(rle, tmp_path / "rle_item.dcm", item + 4, "<I", 0x10000), "truncated encapsulated pixel data")
    # TIFF: StripByteCounts 0, and a strip past the end of the file
    tifffile.imwrite(tmp_path / "t.tif", np.full((16, 16), 7, np.uint8), rowsperstrip=4)
    off, size = _tiff_tag_offset(tmp_path / "t.tif", "StripByteCounts")
    sbc0 = _patch(tmp_path / "t.tif", tmp_path / "sbc0.tif", off, "<H" if size == 2 else "<I", 0)
    _refused(sbc0, "corrupt TIFF file (strip 0: StripByteCounts is 0")
    past = _patch(tmp_path / "t.tif", tmp_path / "past.tif", off + 3 * size, "<H" if size == 2 else "<I", 4000)
    _refused(past, "truncated TIFF file (strip 3 at offset", "declares 4000 bytes")
    # PNG: a chunk length past the end, a CRC that does not match; JPEG: a segment past the end
    png = _png(tmp_path / "p.png", (16, 16))
    _refused(_patch(png, tmp_path / "plen.png", 33, ">I", 1 << 20), "truncated PNG file (chunk IDAT at offset 33 declares")
    flipped = bytearray(png.read_bytes())
    flipped[45] ^= 1
    (tmp_path / "pcrc.png").write_bytes(bytes(flipped))
    _refused(tmp_path / "pcrc.png", "corrupt PNG file (CRC mismatch in chunk IDAT at offset 33)")
    ok, buf = cv2.imencode(".jpg", np.full((16, 16), 90, np.uint8))
    (tmp_path / "j.jpg").write_bytes(buf.tobytes())
    dqt = buf.tobytes().find(b"\xff\xdb")
    _refused(_patch(tmp_path / "j.jpg", tmp_path / "jlen.jpg", dqt + 2, ">H", 60000),
             f"truncated JPEG file (segment 0xFFDB at offset {dqt} declares 60000 bytes")
    # the two wrong successes through the CLI: exit 1, nothing written for them, the good file is
    d = tmp_path / "in"
    d.mkdir()
    for f in (big, sbc0, good):
        (d / f.name).write_bytes(f.read_bytes())
    r = _cli("--model", str(model_path), str(d), "-o", str(tmp_path / "out"))
    assert r.exit_code == 1 and "1 written" in r.output and "2 failed" in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.dcm"]


def _two_jpeg_frames(tmp_path: Path, name: str, *, bot: bool) -> Path:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = make_cr(h=16, w=16)
    frame = np.full((16, 16), 100, np.uint8)
    ds.set_pixel_data(frame, "MONOCHROME2", 8, generate_instance_uid=False)
    ok, buf = cv2.imencode(".jpg", frame)
    ds.PixelData = encapsulate([buf.tobytes(), buf.tobytes()], has_bot=bot)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return _save(ds, tmp_path / name)


def test_geometry_fields_are_checked_before_decoding(tmp_path: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "t.tif", np.full((16, 16), 7, np.uint8))
    off, _ = _tiff_tag_offset(tmp_path / "t.tif", "ImageWidth")
    _refused(_patch(tmp_path / "t.tif", tmp_path / "w0.tif", off, "<H", 0),
             "corrupt TIFF file (ImageWidth 0, ImageLength 16: both must be at least 1)")
    # two encapsulated JPEG frames and no NumberOfFrames: named, not "images must have 1 or 3 channels, got 128"
    _refused(_two_jpeg_frames(tmp_path, "two_nobot.dcm", bot=False),
             "inconsistent DICOM: the pixel data holds 2 encapsulated frames, no NumberOfFrames (1 frame)")
    _refused(_two_jpeg_frames(tmp_path, "two_bot.dcm", bot=True),
             "the basic offset table lists 2 frames, no NumberOfFrames (1 frame)")
    ds = make_cr()
    ds.Rows = 0
    _refused(_save(ds, tmp_path / "rows0.dcm"), "Rows 0, Columns 16")
    ds = make_cr()
    ds.SamplesPerPixel = 3
    _refused(_save(ds, tmp_path / "spp3.dcm"), "inconsistent DICOM: SamplesPerPixel 3 with PhotometricInterpretation MONOCHROME2")
    ds = make_cr()
    ds.HighBit = 3  # BitsStored 12
    _refused(_save(ds, tmp_path / "highbit.dcm"), "inconsistent DICOM bit depth: HighBit 3 with BitsStored 12")
    ds = make_cr()
    ds.NumberOfFrames = 2  # 640 bytes of one 20x16 frame
    _refused(_save(ds, tmp_path / "frames2.dcm"), "pixel data is truncated: 640 bytes, expected 1280")


def test_tile_and_overlap_are_checked_together(tmp_path: Path, model_path: Path) -> None:
    from medsr.runtime import TileConfig

    src = _png(tmp_path / "a.png")
    for args in (["--tile", "3"], ["--tile", "3", "--overlap", "4"], ["--tile", "7"]):
        r = CliRunner().invoke(main, ["--quiet", "--device", "cpu", "--model", str(model_path), *args, str(src),
                                      "-o", str(tmp_path / "o")])
        assert r.exit_code == 2, (args, r.output)
        assert "is smaller than the overlap" in r.output or "overlap must be smaller than the tile" in r.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="tile 3 is smaller than the overlap"):
        Upscaler.from_pretrained(model_path, device="cpu", tile=3)
    assert TileConfig.from_options(3, 0).overlap == 0  # no overlap, asked for explicitly
    assert TileConfig.from_options(8).overlap == 4 and TileConfig.from_options().overlap == 32
    assert TileConfig.from_options(None, 40).tile == 256


def test_non_utf8_names_are_read_and_written_byte_for_byte(tmp_path: Path, model_path: Path) -> None:
    import tifffile

    from medsr.io import write_image

    base = os.fsencode(tmp_path)
    src, out = base + b"/in_\xe9", base + b"/out_\xe9"  # Latin-1 bytes, as an old Windows/Samba share writes them
    os.mkdir(src)
    ok, buf = cv2.imencode(".png", np.full((16, 16), 100, np.uint8))
    with open(src + b"/scan_\xe9.png", "wb") as f:
        f.write(buf.tobytes())
    with open(src + b"/bad_\xe9.png", "wb") as f:
        f.write(buf.tobytes()[:40])
    cmd = [sys.executable, "-m", "medsr.cli.infer", "--quiet", "--device", "cpu", "--model", str(model_path),
           "--tile", "16", "--overlap", "4", src, b"-o", out]
    env = dict(os.environ, LC_ALL="C.UTF-8", PYTHONIOENCODING="")  # a strict UTF-8 terminal
    r = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, err
    assert "1 written" in err and "1 failed" in err and "Traceback" not in err  # the summary is on stderr
    assert os.listdir(out) == [b"scan_\xe9.png"]  # the output's name is the input's bytes
    assert cv2.imdecode(np.fromfile(os.fsdecode(out + b"/scan_\xe9.png"), np.uint8), 0).shape == (64, 64)
    assert "truncated PNG file" in err and "bad_\\udce9.png" in err  # named, escaped, not a crash
    # the API writes every format under such a name, in such a folder; temp names are ASCII
    img = read_image(os.fsdecode(src + b"/scan_\xe9.png"))
    folder = os.fsdecode(out + b"/sub_\xfc")
    tifffile.imwrite(tmp_path / "t.tif", np.full((8, 8), 9, np.uint16))
    sources = {".png": img, ".jpg": read_image(_jpg(tmp_path / "j.jpg")), ".tif": read_image(tmp_path / "t.tif"),
               ".dcm": read_image(_save(make_cr(), tmp_path / "c.dcm"))}
    for suffix, im in sources.items():
        if im.format == "dicom":
            from medsr.io import make_output

            im = make_output(im, np.repeat(np.repeat(im.pixels, 2, 0), 2, 1), 2, "test")
        dest = write_image(im, f"{folder}/r\xe9sum\udce9{suffix}")
        assert os.path.basename(os.fsencode(dest)) == b"r\xc3\xa9sum\xe9" + suffix.encode()
        assert read_image(dest).pixels.shape == im.pixels.shape
    assert not _temps(Path(folder))
    with atomic_write_path(Path(folder) / "x\udce9\udcff.png") as tmp:
        assert tmp.name.isascii() and tmp.parent == Path(folder)
        tmp.write_bytes(b"x")
    assert b"x\xe9\xff.png" in os.listdir(os.fsencode(folder))


def _jpg(path: Path) -> Path:
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))
    path.write_bytes(buf.tobytes())
    return path
