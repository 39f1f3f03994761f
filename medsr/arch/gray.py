"""Fold a 3-channel RRDBNet into an exactly equivalent 1-channel one.

A gray radiograph replicated to RGB and the channel mean of the RGB output equal the output of the
folded model: ``conv_first`` weights are summed over the input colour channels (for each
pixel-unshuffle phase), ``conv_last`` weights and bias are averaged over the output channels.
Everything in between is untouched, so the fold is exact up to float rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from medsr.arch.rrdbnet import RRDBNet


def fold_to_gray(model: RRDBNet) -> RRDBNet:
    """Return a new 1-in/1-out model equivalent to replicate-to-RGB -> model -> channel mean."""
    if model.num_in_ch == 1 and model.num_out_ch == 1:
        return model
    if model.num_in_ch != 3 or model.num_out_ch != 3:
        raise ValueError(f"gray fold needs a 3-channel model, got {model.num_in_ch}->{model.num_out_ch}")
    gray = copy.deepcopy(model)
    r2 = model.unshuffle * model.unshuffle
    with torch.no_grad():
        w = model.conv_first.weight  # [F, 3*r2, 3, 3], channel index = c*r2 + phase
        f = w.shape[0]
        first = nn.Conv2d(r2, f, 3, 1, 1).to(w)
        first.weight.copy_(w.reshape(f, 3, r2, 3, 3).sum(dim=1))
        first.bias.copy_(model.conv_first.bias)
        last = nn.Conv2d(model.num_feat, 1, 3, 1, 1).to(w)
        last.weight.copy_(model.conv_last.weight.mean(dim=0, keepdim=True))
        last.bias.copy_(model.conv_last.bias.mean(dim=0, keepdim=True))
    gray.conv_first = first
    gray.conv_last = last
    gray.num_in_ch = 1
    gray.num_out_ch = 1
    return gray.eval()
