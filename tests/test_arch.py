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
