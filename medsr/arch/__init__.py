"""Network architectures. Knows networks and nothing else: no I/O, no CLI."""

from __future__ import annotations

from medsr.arch.descriptor import ModelDescriptor
from medsr.arch.detect import build_from_state_dict, detect_rrdbnet, unwrap_state_dict
from medsr.arch.gray import fold_to_gray
from medsr.arch.rrdbnet import RRDBNet, pixel_unshuffle, rrdbnet_macs_per_lr_pixel

__all__ = [
    "ModelDescriptor",
    "RRDBNet",
    "build_from_state_dict",
    "detect_rrdbnet",
    "fold_to_gray",
    "pixel_unshuffle",
    "rrdbnet_macs_per_lr_pixel",
    "unwrap_state_dict",
]
