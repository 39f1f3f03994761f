"""ONNX Runtime backend: the CUDA EP on a CUDA device, the CPU EP on CPU; the TensorRT EP only when asked
(``providers="tensorrt"``).

The providers ONNX Runtime really uses are read back from ``session.get_providers()``: when the asked
device's provider is not among them (e.g. onnxruntime-gpu installed but its CUDA libraries missing, where ORT
silently falls back to CPU), opening fails with a BackendError instead of running on another device.

Outputs follow the contract (``medsr.runtime.contract.finish_output``). On CPU the batch goes through numpy
with the memory arena off (per-shape arenas grew RSS to GBs); on CUDA it uses IO binding on torch tensors
(no host round trip) and the HEURISTIC cuDNN algorithm search, so fitted tile shapes do not re-benchmark
every convolution. Precision is what the graph carries (``medsr.precision`` metadata); an fp16 model's
``fallback()`` is the fp32 model beside it (``x.fp16.onnx`` -> ``x.onnx``), if present.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsr.runtime.backend import Backend, BackendError, TileLimits, resolve_device
from medsr.runtime.contract import (
    INPUT_NAME,
    default_batch,
    descriptor_from_metadata,
    finish_output,
    fp32_path_for,
    metadata_from_map,
    profile_for_tiles,
)

_SHORT = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_DEVICE_PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def choose_providers(
    available: Sequence[str], device: torch.device, providers: str | Sequence[str] | None = None
) -> list[str]:
    """Providers to use, best first. ``providers``: None/"auto" (the device's own EP: CUDA or CPU), or
    names (short: tensorrt, cuda, cpu)."""
    if providers is None or providers == "auto":
        want = _DEVICE_PROVIDER[device.type]
        if want not in available:
            raise BackendError(
                f"ONNX Runtime has no {want} here (available: {list(available)}): install onnxruntime-gpu "
                "for CUDA (pip install 'medsr[gpu]'), or use device='cpu'"
            )
        chosen = [want]
    else:
        names = [providers] if isinstance(providers, str) else list(providers)
        chosen = [_SHORT.get(p.lower(), p) for p in names]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise BackendError(
                f"ONNX Runtime providers {missing} are not available here (available: {list(available)}); "
                "install onnxruntime-gpu for CUDA/TensorRT"
            )
    if "CPUExecutionProvider" not in chosen and "CPUExecutionProvider" in available:
        chosen.append("CPUExecutionProvider")
    if not chosen:
        raise BackendError(f"no usable ONNX Runtime provider for device {device} (available: {list(available)})")
    return chosen


def check_active_providers(path: Path, asked: list[str], active: list[str]) -> None:
    """BackendError when the first asked provider is not among those ONNX Runtime actually uses."""
    if asked and asked[0] not in active:
        raise BackendError(
            f"{path}: ONNX Runtime was asked for {asked[0]} but runs on {active} (its libraries are missing or "
            "failed to load: for CUDA install onnxruntime-gpu with a matching CUDA/cuDNN, see docs/install.md); "
            "refusing to run on another device than asked"
        )


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device | None = "auto",
        providers: str | Sequence[str] | None = None,
        expect_scale: int | None = None,
        batch: int | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(f"{path}: onnxruntime is not installed (pip install 'medsr[export]')") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise BackendError(f"{self.path}: ONNX file not found")
        auto = device is None or str(device) == "auto"
        self.device = resolve_device(device)
        available = ort.get_available_providers()
        if auto and self.device.type == "cuda" and "CUDAExecutionProvider" not in available and providers in (None, "auto"):
            self.device = torch.device("cpu")  # "auto": the best device ONNX Runtime has here (CPU-only wheel)
        self._providers_arg = providers
        self.providers = choose_providers(available, self.device, providers)
        self.preferred_batch = batch or default_batch(self.device)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        if self.device.type == "cpu":
            so.enable_cpu_mem_arena = False  # the arena keeps a block per tile shape: GBs of RSS on CPU
        trt = "TensorrtExecutionProvider" in self.providers
        # one session; only the TensorRT EP needs the descriptor (its profile) before the session exists
        self.session = self._open(ort, so, ["CPUExecutionProvider"] if trt else self.providers, None)
        meta = metadata_from_map(dict(self.session.get_modelmeta().custom_metadata_map))
        self.metadata = meta
        self.descriptor = descriptor_from_metadata(meta, self.path)
        self.model_id = meta.get("model_id", self.path.stem)
        self.weights_sha256 = meta.get("weights_sha256", "")
        self.precision = meta.get("precision", "fp32")
        if expect_scale is not None and int(expect_scale) != self.descriptor.scale:
            raise BackendError(
                f"{self.path}: model is x{self.descriptor.scale} ({self.model_id}) but x{expect_scale} was requested; "
                f"export an x{expect_scale} model with medsr-export"
            )
        self._limits = TileLimits(multiple=self.descriptor.size_multiple)
        if trt:
            self.session = self._open(ort, so, self.providers, [self._trt_options() if p == "TensorrtExecutionProvider"
                                                                else self._provider_options(p) for p in self.providers])
        self.active_providers = list(self.session.get_providers())
        check_active_providers(self.path, self.providers, self.active_providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def _provider_options(self, provider: str) -> dict[str, str]:
        if provider == "CUDAExecutionProvider":
            return {"device_id": str(self.device.index or 0), "cudnn_conv_algo_search": "HEURISTIC"}
        return {}

    def _open(self, ort: Any, so: Any, providers: list[str], options: list[dict[str, str]] | None) -> Any:
        opts = options if options is not None else [self._provider_options(p) for p in providers]
        try:
            return ort.InferenceSession(str(self.path), so, providers=providers, provider_options=opts)
        except Exception as e:
            raise BackendError(
                f"{self.path}: ONNX Runtime cannot load the model ({type(e).__name__}: {e}); re-export it with medsr-export"
            ) from e

    def _trt_options(self) -> dict[str, str]:
        """TensorRT EP: one explicit profile (as medsr-export builds) so fitted tile shapes reuse one engine
        instead of triggering a rebuild per new shape; the runtime keeps its tiles inside it."""
        prof = profile_for_tiles(self.descriptor, batch=self.preferred_batch, max_batch=2 * self.preferred_batch)
        self._limits = prof.tile_limits(self.descriptor.size_multiple)

        def shape(dims: tuple[int, ...]) -> str:
            return f"{INPUT_NAME}:" + "x".join(str(d) for d in dims)

        return {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(self.path.parent / ".ort_trt_cache"),
            "trt_timing_cache_enable": "True",
            "trt_profile_min_shapes": shape(prof.min),
            "trt_profile_opt_shapes": shape(prof.opt),
            "trt_profile_max_shapes": shape(prof.max),
        }

    def tile_limits(self) -> TileLimits:
        return self._limits

    def _check(self, batch: torch.Tensor) -> None:
        m = self.descriptor.size_multiple
        if batch.ndim != 4 or batch.shape[1] != self.channels:
            raise BackendError(f"{self.path}: expected [N,{self.channels},h,w], got {tuple(batch.shape)}")
        if batch.shape[2] % m or batch.shape[3] % m:
            raise BackendError(f"{self.path}: tile {tuple(batch.shape[2:])} is not a multiple of {m}")

    @torch.no_grad()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        self._check(batch)
        if self.device.type != "cuda":
            x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
            out = self.session.run([self.output_name], {self.input_name: x})[0]
            return finish_output(torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))).to(batch.device)
        x = batch.detach().to(self.device, torch.float32).contiguous()
        n, c, h, w = x.shape
        s = self.scale
        out_t = torch.empty((n, self.descriptor.out_channels, h * s, w * s), device=self.device, dtype=torch.float32)
        binding = self.session.io_binding()
        dev_id = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", dev_id, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", dev_id, np.float32, tuple(out_t.shape), out_t.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # x is ready before ORT's stream reads it
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        out_t = finish_output(out_t)
        return out_t if batch.device == self.device else out_t.to(batch.device)

    def fallback(self) -> Backend | None:
        if self.precision != "fp16":
            return None
        sibling = fp32_path_for(self.path)
        if sibling is None or not sibling.is_file():
            return None
        return OnnxRuntimeBackend(sibling, device=self.device, providers=self._providers_arg, batch=self.preferred_batch)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
