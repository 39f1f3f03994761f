"""TensorRT backend: deserialize a ``.plan``, one execution context per CUDA stream, double buffering.

``run`` splits the batch into chunks of at most the profile's max batch and alternates them over
``streams`` (default 2) non-default CUDA streams, each with its own execution context. On each
stream: copy in (host->device from pinned memory, or device->device), ``set_input_shape``,
``set_tensor_address`` with torch CUDA tensors, ``execute_async_v3``, copy out. The copies of one
chunk overlap the compute of the other. ``tensorrt`` is imported lazily; without it (or without a
GPU) opening an engine raises a BackendError that says what to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsr.export.tensorrt import check_sidecar, read_sidecar, sidecar_from_dict
from medsr.runtime.backend import Backend, BackendError, TileLimits
from medsr.runtime.onnx_backend import finish_output


@dataclass
class _Slot:
    stream: torch.cuda.Stream
    context: Any


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dt not in table:
        raise BackendError(f"unsupported TensorRT I/O dtype {dt}")
    return table[dt]


def check_batch_shape(path: Path, limits: TileLimits, channels: int, shape: tuple[int, ...]) -> None:
    """BackendError unless ``shape`` is [N, channels, h, w] with N and h x w inside the engine profile."""
    if len(shape) != 4 or shape[1] != channels:
        raise BackendError(f"{path}: expected a [N,{channels},h,w] batch, got {shape}")
    h, w = int(shape[2]), int(shape[3])
    if not limits.accepts(h, w):
        raise BackendError(
            f"{path}: tile {h}x{w} is outside the engine profile (min {limits.min_hw}, max {limits.max_hw}, "
            f"multiple of {limits.multiple}); use a tile inside it, or rebuild with medsr-export --tile {max(h, w)}"
        )


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device | None = "cuda",
        expect_scale: int | None = None,
        streams: int = 2,
        batch: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: engine file not found; build it with medsr-export -o {self.path}")
        side = read_sidecar(self.path)
        check_sidecar(side, self.path, scale=expect_scale)
        self.sidecar = side
        self.descriptor, self.profile = sidecar_from_dict(side)
        self.model_id = side["model_id"]
        self.precision = side["precision"]
        onnx_hint = side.get("onnx_file") or "the .onnx beside it"
        try:
            import tensorrt as trt
        except Exception as e:
            raise BackendError(
                f"{self.path}: TensorRT is not installed ({type(e).__name__}: {e}). Install TensorRT 10+ on a CUDA "
                f"machine, or run {onnx_hint} with ONNX Runtime instead"
            ) from e
        if not torch.cuda.is_available():
            raise BackendError(f"{self.path}: TensorRT engines need a CUDA GPU; none is available. Use {onnx_hint} on CPU")
        dev = torch.device("cuda" if device is None or str(device) in ("auto", "cuda") else device)
        if dev.type != "cuda":
            raise BackendError(f"{self.path}: TensorRT runs on CUDA devices only, not {dev}")
        self.device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        cap = ".".join(str(v) for v in torch.cuda.get_device_capability(self.device))
        check_sidecar(
            side, self.path, tensorrt_version=trt.__version__, gpu_name=torch.cuda.get_device_name(self.device),
            compute_capability=cap,
        )
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise BackendError(
                    f"{self.path}: TensorRT could not deserialize the engine (corrupt file, or built by another "
                    f"TensorRT version/GPU); rebuild it with medsr-export -o {self.path}"
                )
            self.engine = engine
            inputs, outputs = [], []
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
            if len(inputs) != 1 or len(outputs) != 1:
                raise BackendError(f"{self.path}: expected one input and one output, got {inputs} -> {outputs}")
            self.input_name, self.output_name = inputs[0], outputs[0]
            self.in_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.input_name))
            self.out_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.output_name))
            pmin, popt, pmax = engine.get_tensor_profile_shape(self.input_name, 0)
            self._limits = TileLimits(
                min_hw=(int(pmin[2]), int(pmin[3])), max_hw=(int(pmax[2]), int(pmax[3])), max_batch=int(pmax[0]),
                multiple=self.descriptor.size_multiple,
            )
            self.preferred_batch = batch or int(popt[0])
            self._slots = [
                _Slot(torch.cuda.Stream(self.device), engine.create_execution_context()) for _ in range(max(1, streams))
            ]

    def tile_limits(self) -> TileLimits:
        return self._limits

    def _check(self, batch: torch.Tensor) -> None:
        check_batch_shape(self.path, self._limits, self.channels, tuple(batch.shape))

    @torch.no_grad()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        self._check(batch)
        n, _, h, w = batch.shape
        s, c_out = self.scale, self.descriptor.out_channels
        mb = self._limits.max_batch or n
        on_gpu = batch.device.type == "cuda"
        caller = torch.cuda.current_stream(self.device)
        if on_gpu:
            src = batch.detach()
            out = torch.empty((n, c_out, h * s, w * s), device=batch.device, dtype=torch.float32)
        else:
            src = batch.detach().to(torch.float32).contiguous().pin_memory()
            out = torch.empty((n, c_out, h * s, w * s), dtype=torch.float32, pin_memory=True)
        used = set()
        for k, a in enumerate(range(0, n, mb)):
            b = min(n, a + mb)
            slot = self._slots[k % len(self._slots)]
            used.add(k % len(self._slots))
            with torch.cuda.stream(slot.stream):
                slot.stream.wait_stream(caller)  # the input (and `out`) are ready
                if on_gpu:
                    src.record_stream(slot.stream)
                    out.record_stream(slot.stream)
                x = torch.empty((b - a, self.channels, h, w), device=self.device, dtype=self.in_dtype)
                x.copy_(src[a:b], non_blocking=True)
                y = torch.empty((b - a, c_out, h * s, w * s), device=self.device, dtype=self.out_dtype)
                context = slot.context
                context.set_input_shape(self.input_name, tuple(x.shape))
                context.set_tensor_address(self.input_name, x.data_ptr())
                context.set_tensor_address(self.output_name, y.data_ptr())
                if not context.execute_async_v3(slot.stream.cuda_stream):
                    raise BackendError(f"{self.path}: TensorRT execute_async_v3 failed for a {tuple(x.shape)} batch")
                if on_gpu:
                    out[a:b].copy_(finish_output(y.float()))
                else:  # clamp on the GPU, then D2H into pinned memory (overlaps the other stream's compute)
                    out[a:b].copy_(finish_output(y.float()), non_blocking=True)
        for i in used:
            if on_gpu:
                caller.wait_stream(self._slots[i].stream)
            else:
                self._slots[i].stream.synchronize()
        return out

    def fallback(self) -> Backend | None:
        """fp16 engine: the fp32 ONNX beside it (``x.fp16.onnx`` -> ``x.onnx``) on ONNX Runtime, if present."""
        if self.precision != "fp16":
            return None
        from medsr.export.onnx_export import fp32_path_for

        onnx_file = self.sidecar.get("onnx_file")
        fp32 = fp32_path_for(self.path.parent / onnx_file) if onnx_file else None
        if fp32 is None or not fp32.is_file():
            return None
        from medsr.runtime.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(fp32, device=self.device)

    def close(self) -> None:
        self._slots = []
        self.engine = None
