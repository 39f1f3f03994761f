"""OpenVINO backend: the CPU inference engine, fp32 or bf16, from an exported ONNX, an OpenVINO IR (.xml)
or weights (converted in memory with ``openvino.convert_model``).

Precision is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``fp32`` (``f32``, IEEE) or ``bf16`` (needs a CPU with
AVX512-BF16 or AMX; refused elsewhere, never silently run as fp32). The compiled precision is read back from
the compiled model and checked. Each input shape is compiled static (one at a time): the tiler sends one
full-tile shape per image, and static plans reuse buffers (see ``_compile``). Output
follows the contract (``finish_output``); a bf16 backend's ``fallback()`` is the same model in fp32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsr.runtime.backend import Backend, BackendError, TileLimits, resolve_device
from medsr.runtime.contract import (
    default_batch,
    descriptor_from_metadata,
    engine_kind,
    finish_output,
    read_onnx_metadata,
)

_HINT = {"fp32": "f32", "bf16": "bf16"}
_RT_KEY = "medsr"  # rt_info section of an IR written by medsr-export


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendError("OpenVINO is not installed (pip install 'medsr[cpu]' or pip install openvino)") from e
    return ov


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True when OpenVINO can run bf16 natively on this CPU (AVX512-BF16 or AMX); False without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def int8_available() -> bool:
    """True when models can be quantized to int8 here (NNCF installed: ``pip install 'medsr[cpu]'``)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(
        self,
        source: str | os.PathLike[str] | Any,
        *,
        device: str | torch.device | None = "cpu",
        precision: str | None = None,
        expect_scale: int | None = None,
        batch: int | None = None,
        threads: int | None = None,
        _model: Any = None,
    ) -> None:
        ov = _import_openvino()
        dev = resolve_device("cpu" if device in (None, "auto") else device)
        if dev.type != "cpu":
            raise BackendError(f"the OpenVINO backend runs on the CPU here, not {dev}; use ONNX Runtime or TensorRT on GPUs")
        self.device = torch.device("cpu")
        precision = precision or "fp32"
        if precision not in _HINT:
            raise BackendError(f"OpenVINO runs fp32 or bf16 on the CPU, not {precision!r}")
        self._core = ov.Core()
        if precision == "bf16" and not native_bf16():
            caps = self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            raise BackendError(f"this CPU has no native bf16 (OpenVINO capabilities: {caps}); use precision fp32")
        self.path: Path | None = None
        if _model is not None:  # an RRDBNet-like module (weights path opened by open_backend)
            ov_model, meta = _model
        else:
            ov_model, meta = self._read(ov, Path(source))
        self.metadata = meta
        self.descriptor = descriptor_from_metadata(meta, self.path or "model")
        self.model_id = meta.get("model_id", self.path.stem if self.path else "custom")
        self.weights_sha256 = meta.get("weights_sha256", "")
        if meta.get("precision", "fp32") != "fp32":
            raise BackendError(
                f"{self.path}: OpenVINO takes the fp32 model and applies its own precision; this file is "
                f"{meta.get('precision')}: use the fp32 ONNX (x.onnx, not x.fp16.onnx)"
            )
        if expect_scale is not None and int(expect_scale) != self.descriptor.scale:
            raise BackendError(f"{self.path}: model is x{self.descriptor.scale}, x{expect_scale} was requested")
        self.precision = precision
        self.preferred_batch = batch or default_batch(self.device)
        self._ov_model = ov_model
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._threads = threads
        self._shape: tuple[int, ...] | None = None
        self._compile(None)  # dynamic: checks the model compiles and the precision holds, before any tile
        got = str(self._compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        if _HINT[precision] not in got.replace("float32", "f32").replace("bfloat16", "bf16"):
            raise BackendError(f"OpenVINO compiled {got} although {precision} was asked; refusing a silent change")

    def _compile(self, shape: tuple[int, ...] | None) -> None:
        """Compile for one static input shape (None: dynamic N/H/W), replacing the previous compilation.

        Static shapes let OpenVINO plan and reuse intermediate buffers: for a 256-px tile of the default
        model 435 MB instead of 618 MB, and a few % faster. The tiler sends one full-tile shape for every
        image at least a tile large, so this compiles once (about 0.1 s); smaller images recompile."""
        self._request = self._compiled = None  # free the previous plan's buffers first
        model = self._ov_model
        if shape is not None:
            model = model.clone()
            model.reshape(list(shape))
        try:
            self._compiled = self._core.compile_model(model, "CPU", self._config)
        except Exception as e:
            raise BackendError(f"{self.path or 'model'}: OpenVINO cannot compile the model: {e}") from e
        self._request = self._compiled.create_infer_request()
        self._shape = shape

    def _read(self, ov: Any, path: Path) -> tuple[Any, dict[str, str]]:
        self.path = path
        if not path.is_file():
            raise BackendError(f"{path}: model file not found")
        kind = engine_kind(path)
        if kind == "onnx":
            meta = read_onnx_metadata(path)
        elif kind == "openvino":
            meta = {}
        else:
            raise BackendError(f"{path}: OpenVINO opens .onnx or .xml files here (weights: use open_backend)")
        try:
            model = self._core.read_model(str(path))
        except Exception as e:
            raise BackendError(f"{path}: OpenVINO cannot read the model ({type(e).__name__}: {e})") from e
        if kind == "openvino":
            meta = ir_metadata(model, path)
        return model, meta

    @classmethod
    def from_module(cls, module: torch.nn.Module, meta: dict[str, str], **kwargs: Any) -> OpenVINOBackend:
        """Convert a PyTorch model in memory (``openvino.convert_model``, dynamic N/H/W)."""
        ov = _import_openvino()
        d = module.descriptor  # type: ignore[attr-defined]
        m = d.size_multiple
        try:
            ov_model = ov.convert_model(
                module.eval().float().cpu(), example_input=torch.rand(1, d.in_channels, 16 * m, 16 * m),
                input=[ov.PartialShape([-1, d.in_channels, -1, -1])],
            )
        except Exception as e:
            raise BackendError(f"OpenVINO could not convert the model ({type(e).__name__}: {e})") from e
        _release_freed_heap()  # tracing leaves ~130 MB of freed heap that glibc keeps otherwise
        return cls(None, _model=(ov_model, meta), **kwargs)

    def tile_limits(self) -> TileLimits:
        return TileLimits(multiple=self.descriptor.size_multiple)

    @torch.no_grad()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != self.channels:
            raise BackendError(f"expected [N,{self.channels},h,w], got {tuple(batch.shape)}")
        x = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        if self._shape != x.shape:
            self._compile(tuple(x.shape))
        self._request.infer({0: x})
        y = self._request.get_output_tensor(0).data
        return finish_output(torch.from_numpy(np.array(y, dtype=np.float32, copy=True))).to(batch.device)

    def fallback(self) -> Backend | None:
        if self.precision == "fp32":
            return None
        return OpenVINOBackend(
            None, _model=(self._ov_model, self.metadata), precision="fp32", batch=self.preferred_batch,
            threads=self._threads,
        )

    def close(self) -> None:
        self._request = None
        self._compiled = None


def _release_freed_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def ir_metadata(model: Any, path: Path) -> dict[str, str]:
    """The ``medsr`` rt_info block of an IR written by ``medsr-export --openvino``."""
    out: dict[str, str] = {}
    try:
        info = model.get_rt_info()
        block = info[_RT_KEY] if _RT_KEY in info else None
        if block is not None:
            for k in block.astype(dict) if hasattr(block, "astype") else dict(block):
                out[k] = model.get_rt_info([_RT_KEY, k]).astype(str)
    except Exception as e:  # pragma: no cover - malformed IR
        raise BackendError(f"{path}: unreadable medsr metadata in the IR ({e}); re-export it") from e
    if "descriptor" not in out:
        raise BackendError(f"{path}: this OpenVINO IR has no medsr metadata; write it with medsr-export --openvino")
    return out


def set_ir_metadata(model: Any, meta: dict[str, str]) -> None:
    for k, v in meta.items():
        model.set_rt_info(str(v), [_RT_KEY, k])
