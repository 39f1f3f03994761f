"""ONNX Runtime backend: direct runs, through the tiled runtime vs TorchBackend, fallback, open_backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_rrdb

from medsr.export import export_onnx, fp16_path_for
from medsr.runtime.backend import BackendError
from medsr.runtime.engines import open_backend
from medsr.runtime.onnx_backend import OnnxRuntimeBackend, choose_providers


@pytest.fixture(scope="module")
def x2_gray(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = tiny_rrdb(2, 1, seed=7)
    d = tmp_path_factory.mktemp("onnx")
    p = export_onnx(model, d / "g.onnx", model_id="tiny-x2", parity=False).path
    export_onnx(model, fp16_path_for(p), precision="fp16", model_id="tiny-x2", parity=False)
    return model, p


def test_run_matches_torch(x2_gray: tuple[torch.nn.Module, Path]) -> None:
    model, path = x2_gray
    b = open_backend(path, device="cpu")
    assert isinstance(b, OnnxRuntimeBackend) and b.providers == ["CPUExecutionProvider"]
    assert (b.scale, b.channels, b.precision, b.model_id) == (2, 1, "fp32", "tiny-x2")
    assert b.tile_limits().multiple == 2
    x = torch.rand(4, 1, 14, 10)
    y = b.run(x)
    assert y.dtype == torch.float32 and y.shape == (4, 1, 28, 20)
    assert (y - model(x).clamp(0, 1)).abs().max().item() <= 1e-4
    with pytest.raises(BackendError, match="multiple of 2"):
        b.run(torch.rand(1, 1, 7, 8))


def test_tiled_runtime_equals_torch_backend(x2_gray: tuple[torch.nn.Module, Path]) -> None:
    from medsr.runtime import TileConfig, TorchBackend, upscale_array

    model, path = x2_gray
    img = np.random.default_rng(0).random((45, 38, 1), dtype=np.float32)
    cfg = TileConfig(tile=24, overlap=8, batch=4)
    ref = upscale_array(TorchBackend(model, device="cpu", precision="fp32", channels_last=False), img, cfg)
    got = upscale_array(open_backend(path, device="cpu"), img, cfg)
    assert got.shape == ref.shape == (90, 76, 1)
    assert np.abs(got - ref).max() <= 1e-4


def test_fp16_backend_and_fallback(x2_gray: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, path = x2_gray
    b16 = open_backend(fp16_path_for(path), device="cpu")
    assert b16.precision == "fp16"
    x = torch.rand(2, 1, 12, 12)
    err = (b16.run(x) - model(x).clamp(0, 1)).abs().max().item()
    assert err < 5e-3
    fb = b16.fallback()
    assert isinstance(fb, OnnxRuntimeBackend) and fb.precision == "fp32" and fb.path == path
    assert open_backend(path, device="cpu").fallback() is None
    lonely = tmp_path / "lonely.fp16.onnx"
    lonely.write_bytes(fp16_path_for(path).read_bytes())
    assert open_backend(lonely, device="cpu").fallback() is None


def test_open_backend_errors(x2_gray: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, path = x2_gray
    with pytest.raises(BackendError, match=r"x2 .*x4 was requested"):
        open_backend(path, device="cpu", scale=4)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BackendError, match="corrupt.onnx"):
        open_backend(bad, device="cpu")
    with pytest.raises(BackendError, match="unknown model file type"):
        open_backend(tmp_path / "m.bin")


def test_open_backend_weights_gives_torch(tmp_path: Path) -> None:
    from medsr.runtime import TorchBackend

    p = tmp_path / "t.pth"
    torch.save({"params_ema": tiny_rrdb(4, 3).state_dict()}, p)
    b = open_backend(p, device="cpu")
    assert isinstance(b, TorchBackend) and b.scale == 4


def test_choose_providers() -> None:
    allp = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    # auto: the device's own EP (+ CPU for nodes it lacks); TensorRT only when asked for
    assert choose_providers(allp, torch.device("cuda")) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(allp, torch.device("cpu")) == ["CPUExecutionProvider"]
    assert choose_providers(allp, torch.device("cuda"), "tensorrt")[0] == "TensorrtExecutionProvider"
    with pytest.raises(BackendError, match="no CUDAExecutionProvider here"):  # never a silent CPU run
        choose_providers(["CPUExecutionProvider"], torch.device("cuda"))
    assert choose_providers(allp, torch.device("cuda"), "cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], torch.device("cuda"))[0] == "CUDAExecutionProvider"
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        choose_providers(["CPUExecutionProvider"], torch.device("cuda"), ["tensorrt"])


def test_a_provider_that_did_not_load_is_an_error(x2_gray: tuple[torch.nn.Module, Path]) -> None:
    from medsr.runtime.onnx_backend import check_active_providers

    _, path = x2_gray
    b = OnnxRuntimeBackend(path, device="cpu")
    assert b.active_providers == ["CPUExecutionProvider"]  # read back from the session
    # onnxruntime-gpu whose CUDA libraries failed to load: ORT runs on CPU without raising
    with pytest.raises(BackendError, match="asked for CUDAExecutionProvider but runs on .'CPUExecutionProvider'."):
        check_active_providers(path, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
    check_active_providers(path, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                           ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_tensorrt_provider_gets_one_explicit_profile(x2_gray: tuple[torch.nn.Module, Path]) -> None:
    _, path = x2_gray
    b = OnnxRuntimeBackend(path, device="cpu", batch=4)
    assert b.tile_limits().max_hw is None  # CPU: any tile
    opts = b._trt_options()  # what the TensorRT EP would be given (not runnable here)
    assert opts["trt_profile_min_shapes"] == "input:1x1x64x64"  # 2 x the default overlap (32)
    assert opts["trt_profile_opt_shapes"] == "input:4x1x256x256"
    assert opts["trt_profile_max_shapes"] == "input:8x1x256x256"
    lim = b.tile_limits()  # the tiled runtime then stays inside that profile
    assert (lim.min_hw, lim.max_hw, lim.max_batch, lim.multiple) == ((64, 64), (256, 256), 8, 2)
