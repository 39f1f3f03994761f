"""``open_backend(path)``: pick the backend from the file type (:func:`medsr.runtime.contract.engine_kind`).

``.plan`` / ``.engine`` -> TensorRT; ``.onnx`` -> ONNX Runtime (or OpenVINO with ``runtime="openvino"``);
``.xml`` -> OpenVINO IR; ``.pth`` / ``.pt`` / ``.safetensors`` / ``.param`` (or a registry name) -> PyTorch
via ``medsr.weights.load_model`` (or OpenVINO with ``runtime="openvino"``).

``precision``: None = the file's own (fp32 for weights). An ONNX model or engine carries its precision
(fp16 is baked in at export): asking for another one opens the sibling file of that precision when it
exists (``x.onnx`` <-> ``x.fp16.onnx``) and is refused otherwise; it is never silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medsr.runtime.backend import Backend, BackendError
from medsr.runtime.contract import PRECISIONS, engine_kind, fp16_path_for, fp32_path_for

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")


def auto_runtime(path: str | os.PathLike[str], device: str | Any = "auto", precision: str | None = None) -> str:
    """What ``runtime="auto"`` runs: the file type's engine, except weights on the CPU, which run on OpenVINO
    (the fastest CPU path within 0.5/255 of PyTorch fp32, see docs/benchmarks.md) when it is installed."""
    from medsr.runtime.backend import resolve_device

    kind = engine_kind(path)
    if kind != "weights":
        return {"tensorrt": "tensorrt", "onnx": "onnxruntime", "openvino": "openvino"}[kind]
    import importlib.util

    cpu = resolve_device(device).type == "cpu"
    if cpu and precision in (None, "fp32", "bf16") and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return "torch"


def auto_precision(runtime: str, precision: str | None) -> str | None:
    """The precision of the automatic CPU path when none is asked: OpenVINO bf16 on a CPU that computes bf16
    natively (AVX512-BF16 / AMX), OpenVINO fp32 elsewhere. bf16 is the fastest CPU path within 0.5/255 mean
    error of fp32 with an exact 16-bit round trip (benchmarks/results/cpu-cxr-x4: 2.0x fp32, mean error
    0.25/255, 58 dB); ``precision="fp32"`` keeps IEEE fp32. Other runtimes: ``precision`` unchanged."""
    if precision is not None or runtime != "openvino":
        return precision
    from medsr.runtime.openvino_backend import native_bf16

    return "bf16" if native_bf16() else "fp32"


def _open_onnx(path: Path, precision: str | None, **kwargs: Any) -> Backend:
    """ONNX Runtime on ``path``, or on its fp32/fp16 sibling (``x.onnx`` <-> ``x.fp16.onnx``) when the asked
    precision is the sibling's; BackendError when neither runs ``precision`` (read from the metadata)."""
    from medsr.runtime.onnx_backend import OnnxRuntimeBackend

    if precision not in (None, "fp32", "fp16"):
        from medsr.runtime.openvino_backend import native_bf16

        bf16 = "use --runtime openvino for bf16 on this CPU, or " if native_bf16() else "this CPU has no native bf16; use "
        raise BackendError(
            f"{path}: ONNX Runtime runs the precision baked into the ONNX (fp32 or fp16), not {precision!r}; "
            f"{bf16}PyTorch weights on CUDA for tf32/bf16"
        )
    backend = OnnxRuntimeBackend(path, **kwargs)
    if precision is None or backend.precision == precision:
        return backend
    have = backend.precision
    backend.close()
    sibling = fp16_path_for(path) if precision == "fp16" else fp32_path_for(path)
    if sibling is not None and sibling.is_file():
        other = OnnxRuntimeBackend(sibling, **kwargs)
        if other.precision == precision:
            return other
        other.close()
    raise BackendError(
        f"{path}: this ONNX model is {have} and no {precision} sibling "
        f"({sibling.name if sibling else 'x.onnx <-> x.fp16.onnx'}) exists; export one with "
        f"medsr-export{' --fp16' if precision == 'fp16' else ''}, or run it as {have}"
    )


def open_backend(
    path: str | os.PathLike[str],
    *,
    device: str | Any = "auto",
    precision: str | None = None,
    scale: int | None = None,
    runtime: str = "auto",
    **kwargs: Any,
) -> Backend:
    """Open an engine, ONNX model or weights file as a Backend. ``scale``: fail clearly if it differs."""
    if precision is not None and precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise BackendError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    p = Path(path)
    kind = engine_kind(p)
    if kind == "tensorrt":
        if runtime not in ("auto", "tensorrt"):
            raise BackendError(f"{p}: a TensorRT engine runs on TensorRT only, not {runtime}")
        from medsr.runtime.trt_backend import TensorRTBackend

        return TensorRTBackend(p, device=device, expect_scale=scale, precision=precision, **kwargs)
    if kind == "openvino" or runtime == "openvino":
        from medsr.runtime.openvino_backend import OpenVINOBackend

        if kind == "weights":
            from medsr.runtime.contract import onnx_metadata
            from medsr.weights import load_model

            lm = load_model(str(path))
            meta = onnx_metadata(lm.descriptor, model_id=lm.model_id, precision="fp32", weights_sha256=lm.sha256)
            return OpenVINOBackend.from_module(
                lm.model, meta, device=device, precision=precision, expect_scale=scale, **kwargs
            )
        return OpenVINOBackend(p, device=device, precision=precision, expect_scale=scale, **kwargs)
    if kind == "onnx":
        if runtime not in ("auto", "onnxruntime"):
            raise BackendError(f"{p}: an ONNX model runs on ONNX Runtime or OpenVINO, not {runtime}")
        return _open_onnx(p, precision, device=device, expect_scale=scale, **kwargs)
    if runtime not in ("auto", "torch"):
        raise BackendError(f"{p}: weights run on PyTorch or OpenVINO; export an engine for {runtime}")
    from medsr.runtime.backend import resolve_device
    from medsr.runtime.torch_backend import TorchBackend
    from medsr.weights import load_model

    loaded = load_model(str(path))
    if scale is not None and loaded.descriptor.scale != scale:
        raise BackendError(f"{path}: model is x{loaded.descriptor.scale}, x{scale} was requested")
    backend = TorchBackend(loaded.model, device=resolve_device(device), precision=precision or "fp32", **kwargs)
    backend.model_id = loaded.model_id  # type: ignore[attr-defined]
    backend.weights_sha256 = loaded.sha256  # type: ignore[attr-defined]
    return backend
