"""TorchBackend: fp32 parity, bf16 on CPU, channels_last, fallback, gray fold through the tiled runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_rrdb

from medsr.arch import fold_to_gray
from medsr.runtime import BackendError, TileConfig, TorchBackend, iter_strips, resolve_device, upscale_array


def _x(seed: int = 0, c: int = 3, h: int = 12, w: int = 16) -> torch.Tensor:
    return torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_fp32_default_equals_model():
    m = tiny_rrdb(4, 3)
    x = _x()
    with torch.no_grad():
        ref = m(x).clamp(0, 1)
    b = TorchBackend(m)
    assert b.precision == "fp32" and b.device == torch.device("cpu") and b.preferred_batch >= 1
    assert b.scale == 4 and b.channels == 3
    y = b.run(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 48, 64)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    assert b.fallback() is None


def test_bf16_cpu_close_and_fallback():
    m = tiny_rrdb(2, 3)
    x = _x(1)
    ref = TorchBackend(m, channels_last=False).run(x)
    b = TorchBackend(m, precision="bf16")
    y = b.run(x)
    assert y.dtype == torch.float32
    assert float((y - ref).abs().mean()) < 1e-2
    fb = b.fallback()
    assert isinstance(fb, TorchBackend) and fb.precision == "fp32" and fb.device == b.device
    assert b.fallback() is fb  # created once, shares the fp32 weights
    torch.testing.assert_close(fb.run(x), ref, atol=1e-5, rtol=0)


def test_channels_last_equals_contiguous():
    x = _x(2)
    a = TorchBackend(tiny_rrdb(4, 3), channels_last=True).run(x)
    b = TorchBackend(tiny_rrdb(4, 3), channels_last=False).run(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_precision_and_device_errors():
    m = tiny_rrdb(4, 1)
    with pytest.raises(BackendError, match="fp16.*CUDA.*bf16"):
        TorchBackend(m, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchBackend(m, precision="int8")
    with pytest.raises(BackendError, match="unknown device|not supported"):
        TorchBackend(m, device="tpu")
    with pytest.raises(BackendError, match="descriptor"):
        TorchBackend(torch.nn.Conv2d(1, 1, 3))
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("CPU") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(BackendError, match="expected a"):
        TorchBackend(m).run(torch.zeros(1, 3, 8, 8))


def test_nonfinite_output_is_not_clamped_away():
    m = tiny_rrdb(4, 1)
    with torch.no_grad():
        m.conv_last.bias.fill_(float("inf"))
    y = TorchBackend(m).run(torch.rand(1, 1, 8, 8))
    assert torch.isnan(y).all()


def _in_range_rgb(seed: int = 3):
    """A tiny RGB model whose outputs stay inside (0, 1), so clamping commutes with the channel mean."""
    m = tiny_rrdb(4, 3, seed=seed)
    with torch.no_grad():
        m.conv_last.weight.mul_(0.05)
        m.conv_last.bias.fill_(0.5)
    return m


def test_gray_fold_through_tiled_runtime_equals_rgb_mean(rng):
    rgb = _in_range_rgb()
    gray = fold_to_gray(_in_range_rgb())
    img = rng.random((23, 30, 1), dtype=np.float32)
    cfg = TileConfig(tile=16, overlap=4, batch=3)
    got = upscale_array(TorchBackend(gray), img, cfg)
    rgb_out = upscale_array(TorchBackend(rgb), np.repeat(img, 3, axis=2), cfg)
    assert 0.0 < rgb_out.min() and rgb_out.max() < 1.0  # no clamping, so the mean commutes
    np.testing.assert_allclose(got[..., 0], rgb_out.mean(axis=2), atol=1e-5, rtol=0)


def test_bf16_through_runtime_close_to_fp32(rng):
    m = tiny_rrdb(4, 1)
    img = rng.random((20, 20, 1), dtype=np.float32)
    cfg = TileConfig(tile=12, overlap=4)
    a = upscale_array(TorchBackend(m), img, cfg)
    b = upscale_array(TorchBackend(m, precision="bf16"), img, cfg)
    assert float(np.abs(a - b).mean()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_paths(precision, rng):
    m = tiny_rrdb(4, 1)
    img = rng.random((40, 36, 1), dtype=np.float32)
    cfg = TileConfig(tile=16, overlap=4)
    ref = upscale_array(TorchBackend(m, channels_last=False), img, cfg)
    b = TorchBackend(tiny_rrdb(4, 1), device="cuda", precision=precision)
    assert b.device.type == "cuda"
    got = upscale_array(b, img, cfg)
    assert float(np.abs(got - ref).mean()) < (1e-5 if precision == "fp32" else 1e-2)
    strips = list(iter_strips(b, img, cfg))
    assert all(s.device.type == "cuda" for _, _, s in strips)
    if precision != "fp32":
        assert b.fallback() is not None and b.fallback().precision == "fp32"


def test_torch_compile_matches_eager():
    m = tiny_rrdb(2, 1, seed=3)
    x = torch.rand(2, 1, 16, 12)
    with torch.no_grad():
        ref = m(x).clamp(0, 1)
    b = TorchBackend(m, device="cpu", compile=True)
    assert (b.run(x) - ref).abs().max().item() < 1e-5
