"""State-dict detection: infer an RRDBNet configuration from its parameter names and shapes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import torch

from medsr.arch.descriptor import ModelDescriptor
from medsr.arch.rrdbnet import SKIPS, UNSHUFFLE, RRDBNet

_WRAPPERS = ("params_ema", "params", "state_dict", "model", "net_g")
_PREFIXES = ("module.", "model.", "net_g.")


class UnsupportedModelError(ValueError):
    """The state dict is not an RRDBNet this package knows how to build."""


def unwrap_state_dict(obj: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Return the tensor dict from an official checkpoint (``params_ema`` preferred over ``params``)."""
    sd: Mapping[str, object] = obj
    for key in _WRAPPERS:
        inner = sd.get(key) if isinstance(sd, Mapping) else None
        if isinstance(inner, Mapping) and inner:
            sd = inner
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    if not out:
        raise UnsupportedModelError("no tensors found in the checkpoint")
    return out


def detect_rrdbnet(sd: Mapping[str, torch.Tensor]) -> ModelDescriptor:
    """Infer scale, channels, blocks and widths of a BasicSR RRDBNet state dict."""
    need = ("conv_first.weight", "conv_body.weight", "conv_up1.weight", "conv_up2.weight", "conv_hr.weight", "conv_last.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise UnsupportedModelError(f"not a Real-ESRGAN RRDBNet state dict (missing {', '.join(missing)})")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"body\.(\d+)\.rdb1\.conv1\.weight$", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise UnsupportedModelError("RRDBNet body blocks are missing or not numbered 0..N-1")
    num_feat = int(sd["conv_first.weight"].shape[0])
    in_total = int(sd["conv_first.weight"].shape[1])
    out_ch = int(sd["conv_last.weight"].shape[0])
    num_grow = int(sd["body.0.rdb1.conv1.weight"].shape[0])
    for scale, r in UNSHUFFLE.items():
        if in_total == out_ch * r * r:
            return ModelDescriptor(
                arch="RRDBNet",
                scale=scale,
                in_channels=out_ch,
                out_channels=out_ch,
                num_feat=num_feat,
                num_block=len(blocks),
                num_grow_ch=num_grow,
                size_multiple=r,
            )
    raise UnsupportedModelError(
        f"cannot infer the scale: conv_first takes {in_total} channels, conv_last gives {out_ch}"
    )


def recorded_skip(obj: Mapping[str, object]) -> str:
    """The ``skip`` a medsr weights file records in its metadata (``"none"`` when absent)."""
    meta = obj.get("medsr")
    desc = meta.get("descriptor") if isinstance(meta, Mapping) else None
    skip = desc.get("skip", "none") if isinstance(desc, Mapping) else "none"
    if skip not in SKIPS:
        raise UnsupportedModelError(f"unknown skip {skip!r} in the medsr metadata (known: {', '.join(SKIPS)})")
    return str(skip)


def recorded_contract(obj: Mapping[str, object]) -> str:
    """The call contract a medsr weights file records (``descriptor.contract``, or the top-level ``contract`` of
    files written before the descriptor had one); "" when absent."""
    meta = obj.get("medsr")
    if not isinstance(meta, Mapping):
        return ""
    desc = meta.get("descriptor")
    c = desc.get("contract") if isinstance(desc, Mapping) else None
    return str(c or meta.get("contract") or "")


def build_from_state_dict(obj: Mapping[str, object], strict: bool = True) -> RRDBNet:
    """Build an RRDBNet and load the weights (accepts wrapped official checkpoints; a medsr metadata
    block's ``descriptor.skip`` selects the bicubic-skip variant)."""
    sd = unwrap_state_dict(obj)
    model = RRDBNet.from_descriptor(replace(detect_rrdbnet(sd), skip=recorded_skip(obj), contract=recorded_contract(obj)))
    model.load_state_dict(sd, strict=strict)
    return model.eval()
