"""TensorRT backend: deserialize a ``.plan`` (TensorRT 10+), one execution context on one CUDA stream.

``run`` splits the batch into chunks of at most the profile's max batch. Per chunk on the backend's
stream: copy in (host->device, or device->device), ``set_input_shape``, output shape from
``context.get_tensor_shape``, ``set_tensor_address`` with torch CUDA tensors, ``execute_async_v3``,
finish and copy out; the caller's stream waits on it. One context: a second one would double the
engine's activation memory, and the tiled runtime feeds one batch at a time, so it would sit idle.
``tensorrt`` is imported lazily; without it (or without a GPU) opening an engine raises a BackendError
that says what to use instead.

Not executed on this project's machines (no TensorRT builder or runtime is installable here); checked
against the TensorRT 10 and 11 Python APIs with ``shared/tools/trt-api-check``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medsr.runtime.backend import Backend, BackendError, TileLimits
from medsr.runtime.contract import (
    check_sidecar,
    check_tensorrt_version,
    finish_output,
    fp32_path_for,
    read_sidecar,
    sidecar_from_dict,
)


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
        precision: str | None = None,
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
        self.weights_sha256 = side.get("weights_sha256", "")
        self.precision = side["precision"]
        if precision is not None and precision != self.precision:
            raise BackendError(
                f"{self.path}: this engine was built {self.precision}; {precision} was asked. A TensorRT engine "
                f"runs the precision baked into its ONNX: build a {precision} engine with medsr-export"
                + (" --fp16" if precision == "fp16" else "")
            )
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
        check_tensorrt_version(trt.__version__)
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
            self._stream = torch.cuda.Stream(self.device)
            self._context = engine.create_execution_context()
            if self._context is None:
                raise BackendError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")

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
        caller = torch.cuda.current_stream(self.device)
        out = torch.empty((n, c_out, h * s, w * s), device=self.device, dtype=torch.float32)
        src = batch.detach()
        ctx, stream = self._context, self._stream
        with torch.cuda.stream(stream):
            stream.wait_stream(caller)  # the input is ready
            for a in range(0, n, mb):
                b = min(n, a + mb)
                x = src[a:b].to(self.device, self.in_dtype, non_blocking=True).contiguous()
                if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
                    raise BackendError(f"{self.path}: TensorRT refused the input shape {tuple(x.shape)}")
                oshape = tuple(ctx.get_tensor_shape(self.output_name))
                if oshape != (b - a, c_out, h * s, w * s):
                    raise BackendError(
                        f"{self.path}: engine output shape {oshape} for input {tuple(x.shape)}, expected "
                        f"{(b - a, c_out, h * s, w * s)} (x{s}); rebuild the engine"
                    )
                y = torch.empty(oshape, device=self.device, dtype=self.out_dtype)
                ctx.set_tensor_address(self.input_name, x.data_ptr())
                ctx.set_tensor_address(self.output_name, y.data_ptr())
                if not ctx.execute_async_v3(stream.cuda_stream):
                    raise BackendError(f"{self.path}: TensorRT execute_async_v3 failed for a {tuple(x.shape)} batch")
                out[a:b].copy_(finish_output(y))  # x, y belong to this stream's allocator pool
        caller.wait_stream(stream)  # `out` (the caller's) is complete before the caller reads it
        return out if batch.device == self.device else out.to(batch.device)

    def fallback(self) -> Backend | None:
        """fp16 engine: the fp32 ONNX beside it (``x.fp16.onnx`` -> ``x.onnx``) on ONNX Runtime, if present."""
        if self.precision != "fp16":
            return None
        onnx_file = self.sidecar.get("onnx_file")
        fp32 = fp32_path_for(self.path.parent / onnx_file) if onnx_file else None
        if fp32 is None or not fp32.is_file():
            return None
        from medsr.runtime.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(fp32, device=self.device)

    def close(self) -> None:
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.synchronize()  # no kernel may still use the buffers or the context being freed
        self._context = None
        self._stream = None
        self.engine = None
