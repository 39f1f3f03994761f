"""TensorRT: CPU-side behaviour (no TensorRT here) and GPU tests marked ``tensorrt`` (skip without TensorRT + CUDA)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_rrdb

from medsr.export.tensorrt import tensorrt_status
from medsr.runtime.backend import BackendError
from medsr.runtime.contract import make_sidecar, profile_for_tiles, write_sidecar
from medsr.runtime.engines import open_backend
from medsr.runtime.trt_backend import check_batch_shape

TRT_OK, TRT_WHY = tensorrt_status()


def _fake_engine(tmp_path: Path, scale: int = 4) -> Path:
    d = tiny_rrdb(scale, 1).descriptor
    engine = tmp_path / "x.plan"
    engine.write_bytes(b"not really an engine")
    write_sidecar(engine, make_sidecar(
        model_id="tiny", descriptor=d, precision="fp16", profile=profile_for_tiles(d, tile=64, overlap=8),
        io={"input": {"mode": "input", "dtype": "float32"}, "output": {"mode": "output", "dtype": "float32"}},
        tensorrt_version="11.4.0.106", gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
        onnx_file="x.fp16.onnx",
    ))
    return engine


def test_module_imports_without_tensorrt() -> None:
    mod = importlib.import_module("medsr.runtime.trt_backend")
    assert hasattr(mod, "TensorRTBackend")
    importlib.import_module("medsr.export.tensorrt")


@pytest.mark.skipif(TRT_OK, reason="TensorRT and CUDA are available")
def test_open_plan_without_tensorrt_is_clear(tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path)
    with pytest.raises(BackendError) as e:
        open_backend(engine)
    msg = str(e.value)
    assert "x.plan" in msg
    assert "TensorRT is not installed" in msg or "CUDA GPU" in msg
    assert "x.fp16.onnx" in msg  # says what to use instead


def test_missing_engine_and_sidecar(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="engine file not found.*medsr-export"):
        open_backend(tmp_path / "x.plan")
    (tmp_path / "y.engine").write_bytes(b"\0" * 16)
    with pytest.raises(BackendError, match="sidecar y.json is missing"):
        open_backend(tmp_path / "y.engine")


def test_engine_scale_mismatch_and_corrupt_sidecar(tmp_path: Path) -> None:
    engine = _fake_engine(tmp_path, scale=4)
    with pytest.raises(BackendError, match=r"x4 .*x2 was requested.*medsr-export"):
        open_backend(engine, scale=2)
    engine.with_suffix(".json").write_text('{"model_id": "tiny"')
    with pytest.raises(BackendError, match="corrupt engine sidecar"):
        open_backend(engine)


def test_tile_outside_profile_is_clear() -> None:
    d = tiny_rrdb(2, 1).descriptor
    lim = profile_for_tiles(d, tile=64, overlap=8, batch=2, max_batch=4).tile_limits(multiple=2)
    check_batch_shape(Path("e.plan"), lim, 1, (4, 1, 64, 64))
    with pytest.raises(BackendError, match=r"tile 128x64 is outside the engine profile.*--tile"):
        check_batch_shape(Path("e.plan"), lim, 1, (1, 1, 128, 64))
    with pytest.raises(BackendError, match="expected a"):
        check_batch_shape(Path("e.plan"), lim, 1, (1, 3, 64, 64))


# --------------------------------------------------------------------------------------------- GPU
needs_trt = pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_tiny_engine(tmp_path: Path, precision: str) -> None:
    from medsr.export import build_engine, export_onnx, fp16_path_for
    from medsr.export.parity import psnr
    from medsr.runtime import TileConfig, TorchBackend, upscale_array
    from medsr.runtime.trt_backend import TensorRTBackend

    model = tiny_rrdb(4, 1, seed=11)
    onnx32 = export_onnx(model, tmp_path / "t.onnx").path
    src = onnx32 if precision == "fp32" else export_onnx(model, fp16_path_for(onnx32), precision="fp16").path
    prof = profile_for_tiles(model.descriptor, tile=32, overlap=8, batch=2, max_batch=4)
    side = build_engine(src, tmp_path / "t.plan", profile=prof, timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "t.json").is_file() and (tmp_path / "timing.cache").is_file()
    assert side["precision"] == precision and side["profile"]["opt"] == [2, 1, 32, 32]
    b = open_backend(tmp_path / "t.plan", scale=4)
    assert isinstance(b, TensorRTBackend) and b.tile_limits().max_hw == (32, 32)
    x = torch.rand(5, 1, 32, 32)
    ref = model(x).detach().clamp(0, 1)
    for inp in (x, x.cuda()):
        y = b.run(inp).cpu()
        if precision == "fp32":
            assert (y - ref).abs().max().item() <= 1e-3
        else:
            assert psnr(y.numpy(), ref.numpy()) >= 45.0
    img = np.random.default_rng(0).random((70, 51, 1), dtype=np.float32)
    cfg = TileConfig(tile=32, overlap=8, batch=2)
    got = upscale_array(b, img, cfg)
    want = upscale_array(TorchBackend(model, device="cpu", precision="fp32", channels_last=False), img, cfg)
    if precision == "fp32":
        assert np.abs(got - want).max() <= 1e-3
    else:
        assert psnr(got, want) >= 45.0
        assert b.fallback() is not None
    with pytest.raises(BackendError, match="outside the engine profile"):
        b.run(torch.rand(1, 1, 64, 64, device="cuda"))
