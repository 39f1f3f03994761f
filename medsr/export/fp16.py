"""FP16 policy for exported graphs.

The fp16 ONNX is exported from a half-precision copy of the model wrapped so that the graph's I/O
stays float32: ``input(float32) -> Clip[0,1] -> Cast(fp16) -> network in fp16 -> Cast(fp32) -> output``.
All conv weights are fp16 initializers and all compute is fp16; TensorRT 11 (always strongly typed)
and TensorRT 10 with STRONGLY_TYPED build exactly these precisions, no builder flag involved.

Overflow guard: the input is clamped to [0, 1]; :func:`find_overflowing_modules` runs the fp32
model on probe inputs and lists the leaf modules whose activations leave the fp16 range (with a
safety margin). Those are kept in fp32 inside the fp16 graph (:class:`Fp32Island`): the output layer returns fp32,
an interior island saturates back into fp16. The fp16 parity check (PSNR >= 45 dB, finite) has the
last word: an fp16 export that still fails it raises ParityError, and the fp32 model is the answer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

FP16_MAX = 65504.0
#: Activations above this magnitude (fp32 run) are considered unsafe in fp16.
FP16_SAFE_MAX = FP16_MAX / 4


#: Modules whose output is the network output (a float32 island there returns float32).
OUTPUT_MODULES = ("conv_last",)


class Fp32Island(nn.Module):
    """Runs ``inner`` in float32 inside an otherwise half-precision network.

    Returns float32 when it produces the network output, else saturates into the fp16 range
    (no inf, so one overflow cannot turn a whole tile into NaN; the parity check judges the result).
    """

    def __init__(self, inner: nn.Module, output_fp32: bool = False) -> None:
        super().__init__()
        self.inner = inner.float()
        self.output_fp32 = output_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x.float())
        return y if self.output_fp32 else y.clamp(-FP16_MAX, FP16_MAX).half()


class IOWrapper(nn.Module):
    """float32 in [0, 1] -> clamp -> (half) network -> float32. The exported graph's top module."""

    def __init__(self, net: nn.Module, half: bool) -> None:
        super().__init__()
        self.net = net
        self.half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(0.0, 1.0)
        if self.half:
            return self.net(x.half()).float()
        return self.net(x)


@torch.no_grad()
def find_overflowing_modules(
    model: nn.Module, probes: Iterable[torch.Tensor], limit: float = FP16_SAFE_MAX
) -> list[str]:
    """Names of leaf modules whose fp32 output magnitude exceeds ``limit`` on any probe input."""
    hits: set[str] = set()
    hooks = []
    for name, mod in model.named_modules():
        if name and not any(True for _ in mod.children()):

            def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
                if isinstance(out, torch.Tensor) and (not torch.isfinite(out).all() or out.abs().max() > limit):
                    hits.add(name)

            hooks.append(mod.register_forward_hook(hook))
    try:
        for x in probes:
            model(x.float())
    finally:
        for h in hooks:
            h.remove()
    return sorted(hits)


def half_model(model: nn.Module, keep_fp32: Sequence[str] = ()) -> nn.Module:
    """A half-precision deep copy of ``model`` with the named submodules kept in float32."""
    m = copy.deepcopy(model).float().eval()
    originals = {name: copy.deepcopy(m.get_submodule(name)) for name in keep_fp32}  # before .half() rounds them
    m.half()
    for name, inner in originals.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        setattr(parent, leaf, Fp32Island(inner, output_fp32=name in OUTPUT_MODULES))
    return m.eval()


def initializer_dtypes(onnx_path: str) -> dict[str, int]:
    """Count of initializers per ONNX data type name (e.g. ``{"FLOAT16": 120}``)."""
    import onnx

    m = onnx.load(onnx_path)
    out: dict[str, int] = {}
    for init in m.graph.initializer:
        k = onnx.TensorProto.DataType.Name(init.data_type)
        out[k] = out.get(k, 0) + 1
    return out
