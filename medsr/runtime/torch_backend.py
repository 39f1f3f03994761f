"""PyTorch backend: inference_mode, optional autocast / half weights, channels_last, torch.compile."""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from medsr.arch.descriptor import ModelDescriptor
from medsr.runtime.backend import Backend, BackendError, resolve_device
from medsr.runtime.contract import PRECISIONS, default_batch, finish_output

log = logging.getLogger(__name__)

#: the precisions PyTorch runs (``contract.PRECISIONS`` without OpenVINO's int8)
TORCH_PRECISIONS = tuple(p for p in PRECISIONS if p != "int8")


@contextlib.contextmanager
def cuda_fp32_math(tf32: bool):
    """cuDNN convolutions and CUDA matmuls in IEEE fp32 (``tf32=False``) or TensorFloat-32, restoring the
    process-wide flags afterwards. torch enables TF32 for cuDNN convolutions by default, so without
    this "fp32" would silently be TF32 on Ampere and newer GPUs (~1e-5 mean error instead of ~1e-8)."""
    mode = "tf32" if tf32 else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the new API only
        old = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = mode, mode
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = old
    else:  # pragma: no cover - older torch
        old = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = tf32, tf32
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = old


class TorchBackend(Backend):
    """Runs an ``nn.Module`` (e.g. RRDBNet) on CPU or CUDA.

    * ``precision="fp32"`` (default): float32 weights and activations; on CUDA true IEEE fp32 (TF32 off).
    * ``"tf32"``: CUDA only: float32 with TensorFloat-32 convolutions/matmuls (Ampere+; faster, ~1e-5 error).
    * ``"bf16"``: ``torch.autocast`` to bfloat16 (CPU and CUDA); weights stay float32.
    * ``"fp16"``: CUDA only — a half-precision copy of the model (float32 weights are kept for
      :meth:`fallback`). fp16 on CPU raises :class:`BackendError` (slow or unsupported there; the message names what runs).

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
        compile: bool | str = False,
        *,
        descriptor: ModelDescriptor | None = None,
    ) -> None:
        if precision not in TORCH_PRECISIONS:  # int8 is OpenVINO's (an int8 IR), not PyTorch's
            raise ValueError(f"precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        desc = descriptor if descriptor is not None else getattr(model, "descriptor", None)
        if not isinstance(desc, ModelDescriptor):
            raise BackendError("the model has no .descriptor: pass descriptor=ModelDescriptor(...)")
        self.descriptor = desc
        cuda = self.device.type == "cuda"
        if precision == "tf32" and not cuda:
            raise BackendError(f"precision 'tf32' is a CUDA (Ampere+) mode; on this CPU use {cpu_precisions()}")
        if precision == "fp16":
            if not cuda:
                raise BackendError(f"precision 'fp16' needs CUDA; on this CPU use {cpu_precisions()}")
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
        self.preferred_batch = default_batch(self.device)

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
        # compile: True = torch.compile's default mode; a mode name, e.g. "reduce-overhead" (CUDA graphs)
        self._forward = torch.compile(net, mode=compile if isinstance(compile, str) else None) if compile else net
        self._fallback: TorchBackend | None = None

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4 or batch.shape[1] != self.channels:
            raise BackendError(f"expected a [N, {self.channels}, h, w] batch, got shape {tuple(batch.shape)}")
        x = batch.to(device=self.device, dtype=self._in_dtype, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.device.type == "cuda":
                stack.enter_context(cuda_fp32_math(tf32=self.precision == "tf32"))
            if self._autocast is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self._autocast))
            return finish_output(self._forward(x))

    def fallback(self) -> Backend | None:
        """An fp32 backend on the same device sharing the weights (None when already fp32)."""
        if self.precision in ("fp32", "tf32"):
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


def cpu_precisions() -> str:
    """The precisions worth suggesting on this CPU: fp32, and bf16 only where the CPU computes it natively
    (a refusal never recommends what the same machine then refuses or emulates slowly)."""
    from medsr.runtime.openvino_backend import native_bf16

    return "precision 'fp32' or 'bf16'" if native_bf16() else "precision 'fp32' (this CPU has no native bf16)"
