"""``open_backend(path)``: pick the backend from the file type.

``.plan`` / ``.engine`` -> TensorRT; ``.onnx`` -> ONNX Runtime; ``.pth`` / ``.pt`` / ``.safetensors`` /
``.param`` (or a registry name) -> PyTorch via ``medsr.weights.load_model``. ``precision`` applies to
weights only: ONNX models and engines carry their precision (fp16 is baked in at export).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medsr.runtime.backend import Backend, BackendError

TRT_SUFFIXES = {".plan", ".engine"}
ONNX_SUFFIXES = {".onnx"}
WEIGHT_SUFFIXES = {".pth", ".pt", ".safetensors", ".param"}


def open_backend(
    path: str | os.PathLike[str],
    *,
    device: str | Any = "auto",
    precision: str = "fp32",
    scale: int | None = None,
    **kwargs: Any,
) -> Backend:
    """Open an engine, ONNX model or weights file as a Backend. ``scale``: fail clearly if it differs."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in TRT_SUFFIXES:
        from medsr.runtime.trt_backend import TensorRTBackend

        return TensorRTBackend(p, device=device, expect_scale=scale, **kwargs)
    if suffix in ONNX_SUFFIXES:
        from medsr.runtime.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(p, device=device, expect_scale=scale, **kwargs)
    if suffix in WEIGHT_SUFFIXES or not p.suffix:
        from medsr.runtime.backend import resolve_device
        from medsr.runtime.torch_backend import TorchBackend
        from medsr.weights import load_model

        loaded = load_model(str(path))
        if scale is not None and loaded.descriptor.scale != scale:
            raise BackendError(f"{path}: model is x{loaded.descriptor.scale}, x{scale} was requested")
        backend = TorchBackend(loaded.model, device=resolve_device(device), precision=precision, **kwargs)
        if not getattr(backend, "model_id", None):
            try:
                backend.model_id = loaded.model_id  # type: ignore[attr-defined]
            except AttributeError:
                pass
        return backend
    raise BackendError(
        f"{p}: unknown model file type {p.suffix!r}; expected .plan/.engine (TensorRT), .onnx (ONNX Runtime) "
        "or .pth/.safetensors/.param (PyTorch weights)"
    )
