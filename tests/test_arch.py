from __future__ import annotations

import pytest
import torch
from conftest import tiny_rrdb
from torch.nn import functional as F

from medsr.arch import (
    ModelDescriptor,
    RRDBNet,
    build_from_state_dict,
    detect_rrdbnet,
    fold_to_gray,
    pixel_unshuffle,
    rrdbnet_macs_per_lr_pixel,
)
from medsr.arch.detect import UnsupportedModelError, unwrap_state_dict


def test_x4plus_parameter_count_and_basicsr_names() -> None:
    m = RRDBNet()
    assert sum(p.numel() for p in m.parameters()) == 16_697_987
    keys = set(m.state_dict())
    for k in ("conv_first.weight", "body.0.rdb1.conv1.weight", "body.22.rdb3.conv5.bias", "conv_body.weight",
              "conv_up1.weight", "conv_up2.weight", "conv_hr.weight", "conv_last.bias"):
        assert k in keys
    assert "body.23.rdb1.conv1.weight" not in keys


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("shape", [(1, 3, 8, 12), (2, 1, 4, 4), (3, 2, 16, 8)])
def test_pixel_unshuffle_matches_torch(r: int, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    assert torch.equal(pixel_unshuffle(x, r), F.pixel_unshuffle(x, r))


@pytest.mark.parametrize("scale", [4, 2, 1])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_and_descriptor(scale: int, channels: int) -> None:
    m = tiny_rrdb(scale, channels)
    x = torch.rand(2, channels, 8, 12)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, channels, 8 * scale, 12 * scale)
    d = m.descriptor
    assert (d.scale, d.in_channels, d.size_multiple) == (scale, channels, {4: 1, 2: 2, 1: 4}[scale])
    assert ModelDescriptor.from_dict(d.to_dict()) == d


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_detect_and_rebuild_from_state_dict(scale: int) -> None:
    m = RRDBNet(3, 3, scale, num_feat=12, num_block=3, num_grow_ch=6)
    sd = m.state_dict()
    d = detect_rrdbnet(sd)
    assert (d.scale, d.num_feat, d.num_block, d.num_grow_ch, d.in_channels) == (scale, 12, 3, 6, 3)
    # official checkpoints wrap the tensors; params_ema wins over params
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    rebuilt = build_from_state_dict({"params": other, "params_ema": sd})
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, sd[k])
    prefixed = unwrap_state_dict({"module." + k: v for k, v in sd.items()})
    assert set(prefixed) == set(sd)


def test_detect_rejects_foreign_state_dicts() -> None:
    with pytest.raises(UnsupportedModelError, match="missing"):
        detect_rrdbnet({"conv1.weight": torch.zeros(1)})
    sd = tiny_rrdb().state_dict()
    sd["conv_first.weight"] = torch.zeros(8, 5, 3, 3)  # 5 input channels fit no scale
    with pytest.raises(UnsupportedModelError, match="scale"):
        detect_rrdbnet(sd)


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_gray_fold_is_exact(scale: int) -> None:
    m = tiny_rrdb(scale, 3, seed=scale)
    g = fold_to_gray(m)
    assert g.descriptor.in_channels == 1 and g.descriptor.out_channels == 1
    x = torch.rand(2, 1, 8, 16)
    with torch.no_grad():
        ref = m(x.repeat(1, 3, 1, 1)).mean(dim=1, keepdim=True)
        out = g(x)
    assert (ref - out).abs().max().item() < 1e-5
    # the source model is untouched
    assert m.conv_first.weight.shape[1] == 3 * m.unshuffle**2


def test_gray_fold_rejects_odd_channel_counts() -> None:
    with pytest.raises(ValueError, match="3-channel"):
        fold_to_gray(RRDBNet(2, 2, 4, 8, 1, 4))


def test_macs_per_pixel_matches_a_count_by_hooks() -> None:
    m = tiny_rrdb(2, 3)
    macs = 0

    def hook(mod: torch.nn.Conv2d, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal macs
        k = mod.kernel_size[0] * mod.kernel_size[1]
        macs += out.numel() * mod.in_channels * k

    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        m(torch.rand(1, 3, 16, 16))
    assert macs == pytest.approx(rrdbnet_macs_per_lr_pixel(m.descriptor) * 256)


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_bicubic_skip_adds_exactly_the_bicubic_upscale(scale: int) -> None:
    torch.manual_seed(scale)
    plain = RRDBNet(3, 3, scale, 8, 1, 4).eval()
    skip = RRDBNet(3, 3, scale, 8, 1, 4, skip="bicubic").eval()
    skip.load_state_dict(plain.state_dict())  # same keys: the skip has no parameters
    assert skip.descriptor.skip == "bicubic" and plain.descriptor.skip == "none"
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        diff = skip(x) - plain(x)
    up = x if scale == 1 else F.interpolate(x, scale_factor=float(scale), mode="bicubic", align_corners=False)
    assert (diff - up).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="skip"):
        RRDBNet(3, 3, scale, 8, 1, 4, skip="lanczos")


def test_bicubic_skip_survives_save_and_load_and_gray_fold(tmp_path) -> None:
    from medsr.weights.load import load_file, save_weights

    torch.manual_seed(0)
    m = RRDBNet(3, 3, 2, 8, 1, 4, skip="bicubic").eval()
    x = torch.rand(1, 3, 8, 8)
    for name in ("m.safetensors", "m.pth"):
        save_weights(m, tmp_path / name, "t")
        loaded = load_file(tmp_path / name).model
        assert loaded.skip == "bicubic"
        with torch.no_grad():
            assert torch.allclose(loaded(x), m(x), atol=1e-6)
    # a bare state dict (no medsr metadata) is Real-ESRGAN's generator: no skip
    assert build_from_state_dict(m.state_dict()).skip == "none"
    with pytest.raises(UnsupportedModelError, match="skip"):
        build_from_state_dict({**m.state_dict(), "medsr": {"descriptor": {"skip": "lanczos"}}})
    g = fold_to_gray(m)
    xg = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        ref = m(xg.repeat(1, 3, 1, 1)).mean(dim=1, keepdim=True)
        assert (g(xg) - ref).abs().max().item() < 1e-5
