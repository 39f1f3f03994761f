"""Training-only networks: Real-ESRGAN's U-Net discriminator and a VGG19 feature extractor.

``UNetDiscriminatorSN`` uses ``torch.nn.utils.spectral_norm`` so its state dict has the official
parameter names (``conv1.weight_orig``, ``conv1.weight_u``, ...) and loads
``RealESRGAN_x4plus_netD.pth`` as is. ``VGGFeatureExtractor`` rebuilds torchvision's ``vgg19().features``
layer by layer (same indices, so ``features.N.weight`` keys load directly) without needing torchvision.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm


class UNetDiscriminatorSN(nn.Module):
    """Real-ESRGAN's U-Net discriminator with spectral normalisation (4,376,897 params for 3 channels)."""

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, skip_connection: bool = True) -> None:
        super().__init__()
        self.skip_connection = skip_connection
        nf = num_feat
        self.conv0 = nn.Conv2d(num_in_ch, nf, kernel_size=3, stride=1, padding=1)
        self.conv1 = spectral_norm(nn.Conv2d(nf, nf * 2, 4, 2, 1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(nf * 2, nf * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(nn.Conv2d(nf * 4, nf * 8, 4, 2, 1, bias=False))
        self.conv4 = spectral_norm(nn.Conv2d(nf * 8, nf * 4, 3, 1, 1, bias=False))
        self.conv5 = spectral_norm(nn.Conv2d(nf * 4, nf * 2, 3, 1, 1, bias=False))
        self.conv6 = spectral_norm(nn.Conv2d(nf * 2, nf, 3, 1, 1, bias=False))
        self.conv7 = spectral_norm(nn.Conv2d(nf, nf, 3, 1, 1, bias=False))
        self.conv8 = spectral_norm(nn.Conv2d(nf, nf, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(nf, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def act(t: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(t, negative_slope=0.2, inplace=True)

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))
        x4 = act(self.conv4(up(x3)))
        if self.skip_connection:
            x4 = x4 + x2
        x5 = act(self.conv5(up(x4)))
        if self.skip_connection:
            x5 = x5 + x1
        x6 = act(self.conv6(up(x5)))
        if self.skip_connection:
            x6 = x6 + x0
        out = act(self.conv7(x6))
        out = act(self.conv8(out))
        return self.conv9(out)


def adapt_discriminator_state(sd: Mapping[str, torch.Tensor], num_in_ch: int) -> dict[str, torch.Tensor]:
    """Official D checkpoint (``params`` wrapper allowed) for ``num_in_ch`` inputs (3 -> 1: sum over RGB)."""
    inner = sd.get("params", sd) if isinstance(sd, Mapping) else sd
    out = {k.removeprefix("module."): v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    w = out.get("conv0.weight")
    if w is not None and w.shape[1] != num_in_ch:
        if w.shape[1] == 3 and num_in_ch == 1:
            out["conv0.weight"] = w.sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"discriminator takes {w.shape[1]} channels, the model {num_in_ch}")
    return out


# torchvision vgg19 ``features`` layout: (name, kind) per index
VGG19_NAMES = (
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
)  # fmt: skip
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg19_layers() -> list[nn.Module]:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = int(v)
    return layers


class VGGFeatureExtractor(nn.Module):
    """Frozen VGG19 features (BasicSR ``VGGFeatureExtractor``): pre-activation outputs of ``layer_names``.

    Input in [0, 1], ImageNet-normalised inside; 1-channel input is replicated to 3 channels. Layers
    after the deepest requested one are dropped. ``weights``: torchvision-format state dict file.
    """

    def __init__(self, layer_names: list[str], weights: str | Path | None = None) -> None:
        super().__init__()
        unknown = [n for n in layer_names if n not in VGG19_NAMES]
        if unknown:
            raise ValueError(f"unknown VGG19 layers: {unknown}")
        self.layer_names = list(layer_names)
        last = max(VGG19_NAMES.index(n) for n in layer_names)
        self.features = nn.Sequential(*_vgg19_layers()[: last + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self.load_torchvision(weights)
        self.requires_grad_(False)
        self.eval()

    def load_torchvision(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"VGG19 weights not found: {p}")
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        sd = {k.removeprefix("module."): v for k, v in obj.items()}
        ours = self.features.state_dict()
        missing = [k for k in ours if f"features.{k}" not in sd]
        if missing:
            raise ValueError(f"{p} is not a torchvision VGG19 state dict (missing features.{missing[0]} ...)")
        self.features.load_state_dict({k: sd[f"features.{k}"] for k in ours})

    def train(self, mode: bool = True) -> VGGFeatureExtractor:
        return super().train(False)  # always eval

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            name = VGG19_NAMES[i]
            if name in self.layer_names:
                out[name] = x.clone() if i + 1 < len(self.features) else x
        return out
