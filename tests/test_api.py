from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cr, tiny_rrdb

from medsr.api import Upscaler
from medsr.arch import fold_to_gray
from medsr.runtime import TileConfig, TorchBackend


def _upscaler(scale: int = 4, channels: int = 3, tile: int = 32) -> Upscaler:
    m = tiny_rrdb(scale, channels)
    variants = {1: TorchBackend(fold_to_gray(m), device="cpu")} if channels == 3 else {}
    return Upscaler(TorchBackend(m, device="cpu"), TileConfig(tile=tile, overlap=8, batch=2), model_id="tiny", variants=variants)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("shape", [(20, 27), (20, 27, 3), (20, 27, 1)])
def test_numpy_in_numpy_out_keeps_dtype_and_layout(dtype: type, shape: tuple[int, ...], rng: np.random.Generator) -> None:
    up = _upscaler()
    x = rng.random(shape)
    x = (x * np.iinfo(dtype).max).astype(dtype) if dtype != np.float32 else x.astype(np.float32)
    y = up(x)
    assert y.dtype == (np.float32 if dtype == np.float32 else dtype)
    assert y.shape == (shape[0] * 4, shape[1] * 4) + shape[2:]


def test_single_tile_equals_the_model_itself(rng: np.random.Generator) -> None:
    m = tiny_rrdb(4, 3)
    up = Upscaler(TorchBackend(m, device="cpu"), TileConfig(tile=32, overlap=8, batch=1))
    x = rng.random((32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x).permute(2, 0, 1)[None]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(up(x), ref, atol=1e-5)


def test_gray_input_uses_the_exact_fold(rng: np.random.Generator) -> None:
    m = tiny_rrdb(2, 3)
    with torch.no_grad():  # keep outputs inside (0, 1): clamping does not commute with the channel mean
        m.conv_last.weight.mul_(0.05)
        m.conv_last.bias.fill_(0.5)
    cfg = TileConfig(tile=16, overlap=4, batch=2)
    via_rgb = Upscaler(TorchBackend(m, device="cpu"), cfg)  # no gray variant: GrayViaRGB adapter
    folded = Upscaler(TorchBackend(m, device="cpu"), cfg, variants={1: TorchBackend(fold_to_gray(m), device="cpu")})
    assert folded.backend_for(1).channels == 1 and folded.backend_for(1).name == "torch"
    x = rng.random((21, 18)).astype(np.float32)
    a, b = via_rgb(x), folded(x)
    assert 0.0 < a.min() and a.max() < 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_rgb_input_on_gray_model_runs_per_channel(rng: np.random.Generator) -> None:
    up = _upscaler(4, 1, tile=16)
    x = rng.random((12, 10, 3)).astype(np.float32)
    y = up(x)
    for c in range(3):
        np.testing.assert_allclose(y[..., c], up(x[..., c]), atol=1e-6)


def test_bad_arrays_are_rejected() -> None:
    up = _upscaler()
    with pytest.raises(ValueError, match="H x W"):
        up(np.zeros((4, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        up(np.zeros((4, 4), np.int64))


def test_shared_between_threads_gives_the_same_results(rng: np.random.Generator) -> None:
    up = _upscaler(tile=16)
    inputs = [(rng.random((18, 23)) * 65535).astype(np.uint16) for _ in range(4)]
    serial = [up(x) for x in inputs]
    results: list[np.ndarray | None] = [None] * 4

    def work(i: int) -> None:
        results[i] = up(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results, strict=True):
        assert b is not None and np.array_equal(a, b)


def test_upscale_file_keeps_16_bit_and_refuses_to_overwrite_input(tmp_path: Path, rng: np.random.Generator) -> None:
    import cv2

    from medsr.io import read_image

    src = tmp_path / "in.png"
    cv2.imwrite(str(src), (rng.random((17, 19)) * 65535).astype(np.uint16))
    up = _upscaler(tile=16)
    (tmp_path / "out").mkdir()
    dst = up.upscale_file(src, tmp_path / "out" / "in.png")
    out = read_image(dst)
    assert out.pixels.dtype == np.uint16 and out.pixels.shape == (68, 76)
    with pytest.raises(ValueError, match="over the input"):
        up.upscale_file(src, src)
    with pytest.raises(FileExistsError):
        up.upscale_file(src, dst)


def test_from_pretrained_with_a_weights_path(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "tiny_x2.pth"
    torch.save({"params_ema": tiny_rrdb(2, 3).state_dict()}, path)
    up = Upscaler.from_pretrained(path, device="cpu", tile=16, overlap=4)
    assert up.scale == 2 and up.model_id == "tiny_x2"
    assert up((rng.random((9, 11)) * 255).astype(np.uint8)).shape == (18, 22)


def test_upscale_dicom_returns_a_derived_dataset() -> None:
    ds = make_cr("MONOCHROME2", bits_stored=12, h=16, w=20)
    out = _upscaler(tile=16).upscale_dicom(ds)
    assert (out.Rows, out.Columns) == (64, 80)
    assert out.SOPInstanceUID != ds.SOPInstanceUID and out.StudyInstanceUID == ds.StudyInstanceUID
    assert out.pixel_array.max() <= 4095
    assert [float(v) for v in out.PixelSpacing] == [0.05, 0.0375]  # 0.2 x 0.15 mm / 4


def test_plan_and_progress_report_the_tiles_a_call_runs(rng: np.random.Generator, tmp_path: Path) -> None:
    up = _upscaler(tile=16)
    seen: list[tuple[int, int]] = []
    up((rng.random((40, 27)) * 255).astype(np.uint8), progress=lambda d, t: seen.append((d, t)))
    total = up.plan(40, 27).num_tiles
    assert total > 1 and seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # monotone
    import cv2

    cv2.imwrite(str(tmp_path / "a.png"), (rng.random((40, 27)) * 255).astype(np.uint8))
    seen.clear()
    up.upscale_file(tmp_path / "a.png", tmp_path / "o" / "a.png", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (total, total) and (tmp_path / "o" / "a.png").is_file()
    assert up.lr_pixels == 2 * 40 * 27
    with pytest.raises(FileExistsError, match="output exists"):
        up.upscale_file(tmp_path / "a.png", tmp_path / "o" / "a.png")


def test_a_tile_below_a_models_measured_seam_limit_is_warned(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """realesrgan-x4plus shows seams below tile 128 (worst 44.2 dB at 64 over 12 real crops): a smaller
    tile runs, with a warning that names the model and the tile to use; medsr's exact models never warn."""
    import dataclasses
    import logging

    from medsr import Upscaler
    from medsr.api import _warn_small_tile
    from medsr.runtime import TileConfig
    from medsr.weights import registry

    assert registry.MODELS["realesrgan-x4plus"].min_tile == 128
    msg = _warn_small_tile("RealESRGAN_x4plus", TileConfig(tile=64, overlap=32))
    assert msg is not None and "realesrgan-x4plus" in msg and "--tile 128" in msg
    assert _warn_small_tile("realesrgan-x4plus", TileConfig(tile=128)) is None
    assert _warn_small_tile("medsr-cxr-x4", TileConfig(tile=32, overlap=8)) is None
    assert _warn_small_tile("/some/weights.pth", TileConfig(tile=32, overlap=8)) is None
    # through Upscaler.load, the entry point of every tool (a shipped model given a limit for the test)
    entry = dataclasses.replace(registry.MODELS["medsr-cxr-x4-fast"], min_tile=128)
    monkeypatch.setitem(registry.MODELS, "medsr-cxr-x4-fast", entry)
    with caplog.at_level(logging.WARNING, logger="medsr"):
        Upscaler.load("medsr-cxr-x4-fast", runtime="torch", device="cpu", tile=64)
    assert any("tile 64 is below 128 for medsr-cxr-x4-fast" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsr"):
        Upscaler.load("medsr-cxr-x4-fast", runtime="torch", device="cpu", tile=128)
    assert not [r for r in caplog.records if "is below" in r.getMessage()]
