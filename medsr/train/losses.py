"""Losses of Real-ESRGAN: L1 pixel loss, VGG19 perceptual loss and the vanilla GAN loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medsr.train.networks import VGGFeatureExtractor


class PerceptualLoss(nn.Module):
    """BasicSR ``PerceptualLoss`` (L1 between VGG19 pre-activation features, per-layer weights)."""

    def __init__(self, layer_weights: dict[str, float], vgg_path: str, weight: float = 1.0) -> None:
        super().__init__()
        self.layer_weights = {k: float(v) for k, v in layer_weights.items()}
        self.weight = weight
        self.vgg = VGGFeatureExtractor(list(self.layer_weights), vgg_path)

    def forward(self, x: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        fx = self.vgg(x)
        with torch.no_grad():
            fg = self.vgg(gt.detach())
        loss = x.new_zeros(())
        for k, w in self.layer_weights.items():
            loss = loss + F.l1_loss(fx[k].float(), fg[k].float()) * w
        return loss * self.weight


def gan_loss(pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Vanilla GAN loss (BCE with logits; real label 1, fake label 0). Computed in float32."""
    pred = pred.float()
    target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
    return F.binary_cross_entropy_with_logits(pred, target)
