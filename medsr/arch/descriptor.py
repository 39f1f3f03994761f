"""A small frozen description of a super-resolution model (after spandrel's descriptors)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelDescriptor:
    """What the runtime and exporter need to know about a network, and nothing more.

    ``size_multiple``: LR height and width must be multiples of it (pixel-unshuffle factor).
    ``skip``: ``"none"`` (Real-ESRGAN) or ``"bicubic"`` (the output adds the bicubic upscale of the input;
    ``RRDBNet`` documents it). Not visible in a state dict: weights files record it in their metadata.
    ``contract``: the call contract of a task-specific model, "" for plain super-resolution (an image in, the
    upscaled image out). The volume path's models name theirs (``medsr.volumes.throughplane``: what the input
    slice is and what the output means); recorded in the metadata like ``skip`` and carried by every export.
    """

    arch: str
    scale: int
    in_channels: int
    out_channels: int
    num_feat: int
    num_block: int
    num_grow_ch: int
    size_multiple: int = 1
    supports_half: bool = True
    supports_bf16: bool = True
    skip: str = "none"
    contract: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelDescriptor:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})

    def with_channels(self, channels: int) -> ModelDescriptor:
        d = self.to_dict()
        d.update(in_channels=channels, out_channels=channels)
        return ModelDescriptor(**d)
