"""ONNX Runtime backend: TensorRT EP > CUDA EP > CPU EP (by availability, or by the ``providers`` flag).

Outputs follow TorchBackend: float32 clamped to [0, 1], NaN/Inf (fp16 overflow) returned as NaN so the
tiled runtime detects them and re-runs the tile on ``fallback()``. On CPU the batch goes through numpy; on CUDA it uses IO binding on torch tensors (no host round trip).
Precision is what the graph carries (``medsr.precision`` metadata); an fp16 model's ``fallback()`` is
the fp32 model beside it (``x.fp16.onnx`` -> ``x.onnx``), if present.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medsr.runtime.backend import Backend, BackendError, TileLimits, resolve_device

_SHORT = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(
    available: Sequence[str], device: torch.device, providers: str | Sequence[str] | None = None
) -> list[str]:
    """Providers to use, best first. ``providers``: None/"auto", or names (short: tensorrt, cuda, cpu)."""
    if providers is None or providers == "auto":
        wanted = list(_ORDER) if device.type == "cuda" else ["CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available]
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


def finish_output(y: torch.Tensor) -> torch.Tensor:
    """Same output convention as TorchBackend: clamped to [0, 1], NaN/Inf returned as NaN for the runtime's check."""
    nan = float("nan")
    return torch.nan_to_num(y, nan=nan, posinf=nan, neginf=nan).clamp_(0.0, 1.0)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device | None = "auto",
        providers: str | Sequence[str] | None = None,
        expect_scale: int | None = None,
        batch: int = 4,
        threads: int | None = None,
    ) -> None:
        from medsr.export.onnx_export import descriptor_from_metadata, read_onnx_metadata

        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(f"{path}: onnxruntime is not installed (pip install 'medsr[export]')") from e
        self.path = Path(path)
        meta = read_onnx_metadata(self.path)  # BackendError on a missing/corrupt file
        self.metadata = meta
        self.descriptor = descriptor_from_metadata(meta, self.path)
        self.model_id = meta.get("model_id", self.path.stem)
        self.precision = meta.get("precision", "fp32")
        if expect_scale is not None and int(expect_scale) != self.descriptor.scale:
            raise BackendError(
                f"{self.path}: model is x{self.descriptor.scale} ({self.model_id}) but x{expect_scale} was requested; "
                f"export an x{expect_scale} model with medsr-export"
            )
        self.device = resolve_device(device)
        self._providers_arg = providers
        self.providers = choose_providers(ort.get_available_providers(), self.device, providers)
        if self.device.type == "cuda" and self.providers == ["CPUExecutionProvider"]:
            self.device = torch.device("cpu")
        self.preferred_batch = batch
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        prov_opts: list[dict[str, str]] = []
        self._limits = TileLimits(multiple=self.descriptor.size_multiple)
        for p in self.providers:
            if p == "TensorrtExecutionProvider":
                prov_opts.append(self._trt_options())
            elif p == "CUDAExecutionProvider":
                prov_opts.append({"device_id": str(self.device.index or 0)})
            else:
                prov_opts.append({})
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=self.providers, provider_options=prov_opts)
        except Exception as e:
            raise BackendError(f"{self.path}: ONNX Runtime cannot load the model: {e}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def _trt_options(self) -> dict[str, str]:
        """TensorRT EP: one explicit profile (as medsr-export builds) so fitted tile shapes reuse one engine
        instead of triggering a rebuild per new shape; the runtime keeps its tiles inside it."""
        from medsr.export.onnx_export import INPUT_NAME
        from medsr.export.tensorrt import profile_for_tiles

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
        from medsr.export.onnx_export import fp32_path_for

        sibling = fp32_path_for(self.path)
        if sibling is None or not sibling.is_file():
            return None
        return OnnxRuntimeBackend(sibling, device=self.device, providers=self._providers_arg, batch=self.preferred_batch)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
