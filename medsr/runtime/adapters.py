"""Channel adapters: run gray images through RGB engines and RGB images through gray engines.

PyTorch models are folded exactly with :func:`medsr.arch.fold_to_gray` instead (3x less work);
these adapters serve fixed engines (ONNX, TensorRT) whose channel count is baked in.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from medsr.runtime.backend import Backend, TileLimits


class _Wrapped(Backend):
    def __init__(self, inner: Backend, channels: int) -> None:
        self.inner = inner
        self.descriptor = inner.descriptor.with_channels(channels)
        self.device = inner.device
        self.precision = inner.precision
        self.preferred_batch = inner.preferred_batch
        self.name = inner.name

    def tile_limits(self) -> TileLimits:
        return self.inner.tile_limits()

    def close(self) -> None:
        self.inner.close()


class GrayViaRGB(_Wrapped):
    """1-channel input through a 3-channel backend: replicate to RGB, average the output channels."""

    def __init__(self, inner: Backend) -> None:
        if inner.channels != 3:
            raise ValueError(f"GrayViaRGB needs a 3-channel backend, got {inner.channels}")
        super().__init__(inner, 1)

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        return self.inner.run(batch.expand(-1, 3, -1, -1).contiguous()).mean(dim=1, keepdim=True)

    def fallback(self) -> Backend | None:
        fb = self.inner.fallback()
        return GrayViaRGB(fb) if fb is not None else None


class PerChannel(_Wrapped):
    """C-channel input through a 1-channel backend: each channel upscaled independently."""

    def __init__(self, inner: Backend, channels: int) -> None:
        if inner.channels != 1:
            raise ValueError(f"PerChannel needs a 1-channel backend, got {inner.channels}")
        super().__init__(inner, channels)
        self._channels = channels

    def tile_limits(self) -> TileLimits:
        lim = self.inner.tile_limits()
        if lim.max_batch is None:
            return lim
        return replace(lim, max_batch=max(1, lim.max_batch // self._channels))

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        n, c, h, w = batch.shape
        out = self.inner.run(batch.reshape(n * c, 1, h, w))
        return out.reshape(n, c, out.shape[-2], out.shape[-1])

    def fallback(self) -> Backend | None:
        fb = self.inner.fallback()
        return PerChannel(fb, self._channels) if fb is not None else None
