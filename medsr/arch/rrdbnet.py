"""RRDBNet (ESRGAN / Real-ESRGAN generator) with BasicSR-compatible parameter names.

State-dict keys: ``conv_first``, ``body.N.rdb{1,2,3}.conv{1..5}``, ``conv_body``, ``conv_up1``,
``conv_up2``, ``conv_hr``, ``conv_last``. Scale 2 and 1 fold the input with pixel-unshuffle
(written with view/permute/reshape so ONNX exporters produce the right channel order).

``skip="bicubic"`` (medsr's own fidelity models, never Real-ESRGAN's) adds the bicubic upscale of the
input to the output: the network learns only the correction to bicubic. A network trained from scratch
then starts at bicubic's quality instead of at a constant colour, so a short CPU run converges, and what
the network adds is a bounded residual. The skip is part of ``forward``, so every runtime and export
(ONNX ``Resize`` cubic, OpenVINO ``Interpolate``) computes it; state-dict keys are unchanged, so the
variant is recorded in the weights' medsr metadata (``descriptor.skip``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medsr.arch.descriptor import ModelDescriptor

UNSHUFFLE = {4: 1, 2: 2, 1: 4}
SKIPS = ("none", "bicubic")


def pixel_unshuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """Same result as ``torch.nn.functional.pixel_unshuffle`` (channel index c*r*r + i*r + j)."""
    if r == 1:
        return x
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // r, r, w // r, r)
    x = x.permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * r * r, h // r, w // r)


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * 0.2 + x


class RRDBNet(nn.Module):
    """Real-ESRGAN generator. ``RRDBNet()`` is RealESRGAN_x4plus (16,697,987 parameters)."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        skip: str = "none",
        contract: str = "",
    ) -> None:
        super().__init__()
        if skip not in SKIPS:
            raise ValueError(f"RRDBNet skip must be one of {', '.join(SKIPS)}, not {skip!r}")
        if scale not in UNSHUFFLE:
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
        if num_block < 1 or num_feat < 1 or num_grow_ch < 1:
            raise ValueError("num_block, num_feat and num_grow_ch must be positive")
        self.scale = scale
        self.num_in_ch = num_in_ch
        self.num_out_ch = num_out_ch
        self.num_feat = num_feat
        self.num_block = num_block
        self.num_grow_ch = num_grow_ch
        self.skip = skip
        self.contract = contract  # what the input and output mean (ModelDescriptor.contract); forward ignores it
        r = UNSHUFFLE[scale]
        self.unshuffle = r
        self.conv_first = nn.Conv2d(num_in_ch * r * r, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    @property
    def descriptor(self) -> ModelDescriptor:
        return ModelDescriptor(
            arch="RRDBNet",
            scale=self.scale,
            in_channels=self.num_in_ch,
            out_channels=self.num_out_ch,
            num_feat=self.num_feat,
            num_block=self.num_block,
            num_grow_ch=self.num_grow_ch,
            size_multiple=self.unshuffle,
            supports_half=True,
            supports_bf16=True,
            skip=self.skip,
            contract=self.contract,
        )

    @classmethod
    def from_descriptor(cls, d: ModelDescriptor) -> RRDBNet:
        if d.arch != "RRDBNet":
            raise ValueError(f"not an RRDBNet descriptor: {d.arch}")
        return cls(d.in_channels, d.out_channels, d.scale, d.num_feat, d.num_block, d.num_grow_ch, d.skip, d.contract)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(feat)
        body_feat = self.conv_body(self.body(feat))
        feat = feat + body_feat
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        if self.skip == "bicubic":
            if self.scale == 1:
                return out + x
            out = out + F.interpolate(x, scale_factor=float(self.scale), mode="bicubic", align_corners=False)
        return out


def rrdbnet_macs_per_lr_pixel(d: ModelDescriptor) -> float:
    """Multiply-accumulates per LR input pixel (analytic; for achieved-TFLOP/s reports)."""
    r = d.size_multiple
    f, g = d.num_feat, d.num_grow_ch
    k = 9
    # pixel counts relative to one LR pixel: the trunk runs at LR/r^2, the x2 and x4 stages at 4x and 16x that
    trunk_px = 1.0 / (r * r)
    rdb = sum((f + i * g) * g for i in range(4)) + (f + 4 * g) * f
    trunk = d.in_channels * r * r * f + 3 * rdb * d.num_block + f * f
    up_px1 = trunk_px * 4
    up_px2 = trunk_px * 16
    tail = f * f * up_px1 + (f * f + f * d.out_channels) * up_px2 + f * f * up_px2
    return float(k * (trunk * trunk_px + tail))
