"""Inference runtime: the Backend interface, the PyTorch backend and the tiled, strip-streaming upscaler.

ONNX Runtime / TensorRT backends live in their own modules and import their libraries lazily.
"""

from __future__ import annotations

from medsr.runtime.backend import Backend, BackendError, NonFiniteOutputError, TileLimits, resolve_device
from medsr.runtime.tiling import TileConfig, TilePlan, default_convert, iter_strips, plan_tiles, upscale_array
from medsr.runtime.torch_backend import TorchBackend

__all__ = [
    "Backend",
    "BackendError",
    "NonFiniteOutputError",
    "TileConfig",
    "TileLimits",
    "TilePlan",
    "TorchBackend",
    "default_convert",
    "iter_strips",
    "plan_tiles",
    "resolve_device",
    "upscale_array",
]
