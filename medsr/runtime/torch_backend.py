"""PyTorch backend: inference_mode, optional autocast / half weights, channels_last, torch.compile."""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from medsr.arch.descriptor import ModelDescriptor
from medsr.runtime.backend import Backend, BackendError, resolve_device

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")


class TorchBackend(Backend):
    """Runs an ``nn.Module`` (e.g. RRDBNet) on CPU or CUDA.

    * ``precision="fp32"`` (default): float32 weights and activations.
    * ``"bf16"``: ``torch.autocast`` to bfloat16 (CPU and CUDA); weights stay float32.
    * ``"fp16"``: CUDA only — a half-precision copy of the model (float32 weights are kept for
      :meth:`fallback`). fp16 on CPU raises :class:`BackendError` (slow or unsupported there; use bf16).

    The backend takes the module over: it is put in eval mode, cast to float32 and moved to the
    device (and to channels_last memory format when ``channels_last``). Output is float32 on the
    device clamped to [0, 1]; NaN/Inf outputs are returned as NaN (not clamped away) so that the tiled
    runtime can detect them. Not thread-safe: use one backend per thread, or a lock.
    """

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
        *,
        descriptor: ModelDescriptor | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        desc = descriptor if descriptor is not None else getattr(model, "descriptor", None)
        if not isinstance(desc, ModelDescriptor):
            raise BackendError("the model has no .descriptor: pass descriptor=ModelDescriptor(...)")
        self.descriptor = desc
        cuda = self.device.type == "cuda"
        if precision == "fp16":
            if not cuda:
                raise BackendError("precision 'fp16' needs CUDA; on CPU use precision='bf16' or 'fp32'")
            if not desc.supports_half:
                raise BackendError(f"{desc.arch} does not support fp16; use precision='fp32'")
        if precision == "bf16":
            if not desc.supports_bf16:
                raise BackendError(f"{desc.arch} does not support bf16; use precision='fp32'")
            if cuda and not torch.cuda.is_bf16_supported():
                raise BackendError("this GPU does not support bf16; use precision='fp16' or 'fp32'")
        self.precision = precision
        self.channels_last = channels_last
        self.compiled = compile
        self.preferred_batch = 4

        src = model.eval().float().to(self.device)
        if channels_last:
            src = src.to(memory_format=torch.channels_last)
        for p in src.parameters():
            p.requires_grad_(False)
        self._source = src  # float32 weights, shared with the fallback
        if precision == "fp16":
            net = copy.deepcopy(src).half()
            self._in_dtype = torch.float16
        else:
            net = src
            self._in_dtype = torch.float32
        self._net = net
        self._autocast = torch.bfloat16 if precision == "bf16" else None
        self._forward = torch.compile(net) if compile else net
        self._fallback: TorchBackend | None = None

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4 or batch.shape[1] != self.channels:
            raise BackendError(f"expected a [N, {self.channels}, h, w] batch, got shape {tuple(batch.shape)}")
        x = batch.to(device=self.device, dtype=self._in_dtype, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = (
            torch.autocast(self.device.type, dtype=self._autocast)
            if self._autocast is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode():
            with ctx:
                y = self._forward(x)
            y = y.float()
            nan = float("nan")
            return torch.nan_to_num(y, nan=nan, posinf=nan, neginf=nan).clamp_(0.0, 1.0)

    def fallback(self) -> Backend | None:
        """An fp32 backend on the same device sharing the weights (None when already fp32)."""
        if self.precision == "fp32":
            return None
        if self._fallback is None:
            self._fallback = TorchBackend(
                self._source, self.device, "fp32", self.channels_last, False, descriptor=self.descriptor
            )
        return self._fallback

    def close(self) -> None:
        self._fallback = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
