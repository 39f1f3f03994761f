"""Minimal backends used only when medsr.runtime's are not importable (keeps the bench usable alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medsr.runtime.backend import Backend


class FallbackTorchBackend(Backend):
    name = "torch-fallback"

    def __init__(self, model: Any, device: str, precision: str, channels_last: bool, compile: bool) -> None:
        self.descriptor = model.descriptor
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        m = model.to(self.device).float().eval()
        if precision == "fp16":
            m = m.half()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        self.model = torch.compile(m) if compile else m

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "fp16":
            return self.model(x.half()).float().contiguous()
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.model(x).float().contiguous()
        return self.model(x).contiguous()


class FallbackOrtBackend(Backend):
    name = "onnxruntime-fallback"

    def __init__(self, onnx_path: Path, descriptor: Any, device: str) -> None:
        import onnxruntime as ort

        self.descriptor = descriptor
        self.device = torch.device(device)
        cuda = device == "cuda"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(onnx_path), providers=providers)
        self.input = self.session.get_inputs()[0]
        self.half = "float16" in self.input.type

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().cpu().numpy().astype("float16" if self.half else "float32")
        (y,) = self.session.run(None, {self.input.name: x})
        return torch.from_numpy(y.astype("float32")).to(self.device)
