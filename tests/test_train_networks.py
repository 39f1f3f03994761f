"""U-Net discriminator and VGG19 feature extractor (no torchvision, no downloads)."""

from __future__ import annotations

import pytest
import torch

from medsr.train.losses import PerceptualLoss, gan_loss
from medsr.train.networks import (
    VGG19_NAMES,
    UNetDiscriminatorSN,
    VGGFeatureExtractor,
    adapt_discriminator_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_discriminator_param_count_and_shape() -> None:
    d = UNetDiscriminatorSN(num_in_ch=3, num_feat=64, skip_connection=True)
    assert _count(d) == 4_376_897
    keys = d.state_dict().keys()
    assert {"conv1.weight_orig", "conv1.weight_u", "conv1.weight_v", "conv0.weight", "conv9.bias"} <= set(keys)
    tiny = UNetDiscriminatorSN(1, 8)
    out = tiny(torch.rand(2, 1, 32, 48))
    assert out.shape == (2, 1, 32, 48)


def test_discriminator_gray_fold_of_official_state() -> None:
    torch.manual_seed(0)
    d3 = UNetDiscriminatorSN(3, 8)
    sd = adapt_discriminator_state({"params": d3.state_dict()}, 1)
    d1 = UNetDiscriminatorSN(1, 8)
    d1.load_state_dict(sd)
    d1.eval()
    d3.eval()
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(d1(x), d3(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-3)


def test_vgg_layers_and_param_count() -> None:
    vgg = VGGFeatureExtractor(["conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4"])
    assert _count(vgg) == 20_024_384  # all 16 convs of VGG19 up to conv5_4
    assert len(vgg.features) == VGG19_NAMES.index("conv5_4") + 1
    assert not any(p.requires_grad for p in vgg.parameters())
    small = VGGFeatureExtractor(["conv1_2", "conv2_2"])
    assert _count(small) == (3 * 64 * 9 + 64) + (64 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + (128 * 128 * 9 + 128)
    feats = small(torch.rand(2, 1, 32, 32))  # gray replicated to RGB
    assert feats["conv1_2"].shape == (2, 64, 32, 32)
    assert feats["conv2_2"].shape == (2, 128, 16, 16)
    assert feats["conv1_2"].min() < 0  # pre-activation


def test_vgg_loads_torchvision_state_dict(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {}
    cin = 3
    for idx, cout in ((0, 64), (2, 64), (5, 128), (7, 128)):
        sd[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        sd[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
        cin = cout
    sd["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "vgg19-synthetic.pth"
    torch.save(sd, path)
    vgg = VGGFeatureExtractor(["conv1_2", "conv2_2"], path)
    torch.testing.assert_close(vgg.features[2].weight, sd["features.2.weight"])
    torch.testing.assert_close(vgg.features[7].bias, sd["features.7.bias"])
    with pytest.raises(ValueError, match="torchvision VGG19"):
        VGGFeatureExtractor(["conv3_1"], path)
    loss = PerceptualLoss({"conv1_2": 0.1, "conv2_2": 0.1}, str(path))
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    value = loss(x, torch.rand(1, 1, 16, 16))
    value.backward()
    assert value > 0 and x.grad is not None
    assert loss(x.detach(), x.detach()) == 0


def test_gan_loss() -> None:
    z = torch.zeros(2, 1, 4, 4)
    assert torch.isclose(gan_loss(z, True), torch.tensor(0.6931), atol=1e-4)
    assert gan_loss(torch.full((1,), 10.0), True) < 1e-3
    assert gan_loss(torch.full((1,), -10.0), False) < 1e-3
