"""The inference paths ``medsr-bench`` knows, whether each can run here, and how to build its backend.

A path is one (backend, precision, layout) combination. ``unavailable(spec, device)`` returns the
reason a path cannot run on this machine (no CUDA, no TensorRT, no onnxruntime-gpu, ...) or None;
``build_backend`` may still raise :class:`PathSkipped` (e.g. torch.compile failing), and the caller
reports the path as "skipped: <reason>" instead of dropping it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PathSkipped(RuntimeError):
    """This path cannot run here; the message is the reason shown in the table."""


@dataclass(frozen=True)
class PathSpec:
    name: str
    kind: str  # "torch" | "onnxruntime" | "openvino" | "tensorrt"
    precision: str  # "fp32" | "bf16" | "fp16"
    device: str  # "bench": the bench device; "cpu"; "cuda"
    channels_last: bool = False
    compile: bool | str = False  # True, or a torch.compile mode ("reduce-overhead": CUDA graphs)
    description: str = ""

    def resolved_device(self, bench_device: str) -> str:
        return bench_device if self.device == "bench" else self.device

    def peak_precision(self, bench_device: str) -> str:
        """Precision of the GEMM peak this path is compared against (the precision it runs)."""
        return self.precision


PATHS: tuple[PathSpec, ...] = (
    PathSpec("torch-fp32", "torch", "fp32", "bench", description="PyTorch eager fp32, NCHW (the reference)"),
    PathSpec("torch-fp32-cl", "torch", "fp32", "bench", channels_last=True, description="PyTorch fp32, channels_last"),
    PathSpec("torch-bf16-cl", "torch", "bf16", "bench", channels_last=True, description="PyTorch bf16 autocast, channels_last"),
    PathSpec("torch-tf32-cl", "torch", "tf32", "cuda", channels_last=True,
             description="PyTorch TF32 convolutions, channels_last (GPU)"),
    PathSpec("torch-fp16-cl", "torch", "fp16", "cuda", channels_last=True, description="PyTorch fp16, channels_last (GPU)"),
    PathSpec("torch-compile", "torch", "fp32", "bench", channels_last=True, compile=True,
             description="torch.compile, channels_last, fp32"),
    PathSpec("torch-compile-fp16", "torch", "fp16", "cuda", channels_last=True, compile=True,
             description="torch.compile, channels_last, fp16 (GPU)"),
    PathSpec("torch-cudagraph-fp16", "torch", "fp16", "cuda", channels_last=True, compile="reduce-overhead",
             description="torch.compile mode reduce-overhead (CUDA graphs), channels_last, fp16 (GPU)"),
    PathSpec("ort-cpu", "onnxruntime", "fp32", "cpu", description="ONNX Runtime CPUExecutionProvider, fp32 ONNX"),
    PathSpec("ov-fp32", "openvino", "fp32", "cpu", description="OpenVINO CPU, fp32 ONNX, inference precision f32"),
    PathSpec("ov-bf16", "openvino", "bf16", "cpu", description="OpenVINO CPU, fp32 ONNX, inference precision bf16"),
    PathSpec("ov-int8", "openvino", "int8", "cpu",
             description="OpenVINO CPU, NNCF int8 IR (calibrated on $MEDSR_CALIBRATION crops, else synthetic)"),
    PathSpec("ort-cuda", "onnxruntime", "fp32", "cuda", description="ONNX Runtime CUDAExecutionProvider, fp32 ONNX"),
    PathSpec("ort-cuda-fp16", "onnxruntime", "fp16", "cuda", description="ONNX Runtime CUDAExecutionProvider, fp16 ONNX"),
    PathSpec("trt-fp16", "tensorrt", "fp16", "cuda", description="TensorRT engine, FP16"),
)
PATH_NAMES: tuple[str, ...] = tuple(p.name for p in PATHS)
SMOKE_PATHS: tuple[str, ...] = ("torch-fp32", "torch-fp32-cl", "torch-bf16-cl", "ort-cpu", "ov-fp32")


def get_path(name: str) -> PathSpec:
    for p in PATHS:
        if p.name == name:
            return p
    raise KeyError(f"unknown path {name!r}; known: {', '.join(PATH_NAMES)}")


def resolve_device(device: str) -> str:
    """The runtime's device rule (:func:`medsr.runtime.backend.resolve_device`) as a device type; a missing
    GPU skips the path."""
    from medsr.runtime.backend import BackendError
    from medsr.runtime.backend import resolve_device as _resolve

    try:
        return _resolve(device).type
    except BackendError as e:
        raise PathSkipped(str(e)) from None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def unavailable(spec: PathSpec, bench_device: str) -> str | None:
    """Why ``spec`` cannot run with the bench on ``bench_device``; None if it should."""
    import torch

    dev = spec.resolved_device(bench_device)
    if dev == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        if bench_device != "cuda":
            return "bench device is cpu (use --device cuda)"
    if spec.kind == "torch" and spec.precision == "fp16" and dev == "cpu":
        return "fp16 is a GPU path (CPU uses bf16)"
    if spec.kind == "onnxruntime":
        if not _has_module("onnxruntime"):
            return "onnxruntime not installed (pip install medsr[export])"
        import onnxruntime as ort

        if dev == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime-gpu not installed (no CUDAExecutionProvider)"
        if not _has_module("onnx"):
            return "onnx not installed (needed to export the model)"
    if spec.kind == "openvino":
        if not _has_module("openvino"):
            return "openvino not installed (pip install medsr[cpu])"
        if not _has_module("onnx"):
            return "onnx not installed (needed to export the model)"
        if bench_device == "cuda":
            return "OpenVINO is a CPU path (run with --device cpu)"
        if spec.precision == "int8" and not _has_module("nncf"):
            return "nncf not installed (pip install medsr[cpu]): needed to quantize"
    if spec.kind == "tensorrt":
        if not _has_module("tensorrt"):
            return "TensorRT not installed (python package 'tensorrt')"
        try:
            from medsr.export import tensorrt_status
        except ImportError as e:
            return f"medsr.export TensorRT support not available ({e})"
        ok, why = tensorrt_status()
        if not ok:
            return why
    return None


# ------------------------------------------------------------------------------------------- building


def _torch_backend(spec: PathSpec, model: Any, device: str) -> Any:
    from medsr.runtime import TorchBackend

    return TorchBackend(model, device=device, precision=spec.precision, channels_last=spec.channels_last,
                        compile=spec.compile)


def export_onnx_file(model: Any, path: Path, tile: int, precision: str = "fp32") -> Path:
    """Export ``model`` to ONNX at ``path`` with medsr.export (parity check off: the bench measures error)."""
    from medsr.export import export_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(export_onnx(model, path, precision=precision, parity=False).path)


def _ort_backend(spec: PathSpec, model: Any, device: str, workdir: Path, tile: int) -> Any:
    onnx_path = export_onnx_file(copy.deepcopy(model).cpu().float(), workdir / f"model-{spec.precision}.onnx", tile, spec.precision)
    from medsr.runtime.engines import open_backend

    return open_backend(onnx_path, device=device, precision=spec.precision)


def _ov_backend(spec: PathSpec, model: Any, workdir: Path, tile: int) -> Any:
    onnx_path = workdir / "model-fp32.onnx"
    if not onnx_path.is_file():
        export_onnx_file(copy.deepcopy(model).cpu().float(), onnx_path, tile, "fp32")
    from medsr.runtime.engines import open_backend

    if spec.precision == "int8":
        return open_backend(_int8_ir(onnx_path, model.descriptor.in_channels, workdir), device="cpu")
    return open_backend(onnx_path, device="cpu", precision=spec.precision, runtime="openvino")


#: crops the bench quantizes on (speed is what the bench measures; fidelity: medsr-eval on the evaluation set)
BENCH_CALIB_COUNT = 32


def _int8_ir(onnx_path: Path, channels: int, workdir: Path) -> Path:
    """An int8 IR of the ONNX, calibrated on ``$MEDSR_CALIBRATION`` (a folder of training images) when set,
    else on synthetic radiograph crops."""
    import os

    from medsr.export.int8 import CALIB_SIZE, export_int8_ir, synthetic_crops_dir

    calib = os.environ.get("MEDSR_CALIBRATION") or str(synthetic_crops_dir(workdir / "calib", count=4))
    return export_int8_ir(onnx_path, workdir / "model.int8.xml", calib, size=CALIB_SIZE, count=BENCH_CALIB_COUNT)


def _trt_backend(spec: PathSpec, model: Any, workdir: Path, tile: int, batch: int) -> Any:
    """fp16 ONNX (fp32 I/O) -> TensorRT engine with one profile at exactly ``tile`` x ``batch``."""
    from medsr.export import build_engine, profile_for_tiles
    from medsr.runtime.engines import open_backend

    onnx_path = export_onnx_file(copy.deepcopy(model).cpu().float(), workdir / "model-trt.onnx", tile, "fp16")
    plan = workdir / "model-fp16.plan"
    profile = profile_for_tiles(model.descriptor, tile=tile, overlap=0, batch=batch, max_batch=batch)
    build_engine(onnx_path, plan, profile=profile)
    return open_backend(plan, device="cuda", precision="fp16")


def build_backend(spec: PathSpec, model: Any, bench_device: str, workdir: Path, tile: int = 64, batch: int = 1) -> Any:
    """A ready Backend for ``spec`` (a private copy of ``model``); raises PathSkipped with a reason."""
    reason = unavailable(spec, bench_device)
    if reason:
        raise PathSkipped(reason)
    device = spec.resolved_device(bench_device)
    try:
        if spec.kind == "torch":
            return _torch_backend(spec, copy.deepcopy(model), device)
        if spec.kind == "onnxruntime":
            return _ort_backend(spec, model, device, workdir, tile)
        if spec.kind == "openvino":
            return _ov_backend(spec, model, workdir, tile)
        if spec.kind == "tensorrt":
            return _trt_backend(spec, model, workdir, tile, batch)
    except PathSkipped:
        raise
    except Exception as e:  # a path that cannot be built is reported, not fatal
        raise PathSkipped(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()) from e
    raise PathSkipped(f"unknown backend kind {spec.kind!r}")
