"""OpenVINO backend: the CPU inference engine, fp32 or bf16, from an exported ONNX, an OpenVINO IR (.xml)
or weights (converted in memory with ``openvino.convert_model``).

Precision is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``fp32`` (``f32``, IEEE) or ``bf16`` (needs a CPU with
AVX512-BF16 or AMX; refused elsewhere, never silently run as fp32). The compiled precision is read back from
the compiled model and checked. Each input shape is compiled static (one at a time): the tiler sends one
full-tile shape per image, and static plans reuse buffers (see ``_compile``). Output
follows the contract (``finish_output``); a bf16 backend's ``fallback()`` is the same model in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
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

#: the inference precision hint per medsr precision; int8 is an int8-quantized IR (medsr-export --int8): its
#: quantized convolutions run in int8, everything else in f32
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
_RT_KEY = "medsr"  # rt_info section of an IR written by medsr-export


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendError("OpenVINO is not installed (pip install 'medsr[cpu]' or pip install openvino)") from e
    return ov


_TELEMETRY_MU = threading.Lock()


@contextlib.contextmanager
def telemetry_off() -> Iterator[None]:
    """No usage telemetry from OpenVINO's Python tools (``convert_model``, NNCF) while inside.

    Both send events through ``openvino_telemetry`` unless the user opted out, and each send forks a process
    that posts to Google Analytics. A medical tool must not phone home; and on a machine without internet
    that child can hang in DNS resolution, which made the interpreter wait for it at exit (seen: a test run
    that had finished kept its process alive for over 10 minutes). The tools decline telemetry when ``CI`` is
    "true" (``disable_in_ci``), so it is set for the duration of the call and restored after."""
    with _TELEMETRY_MU:
        old = os.environ.get("CI")
        os.environ["CI"] = "true"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("CI", None)
            else:
                os.environ["CI"] = old


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True when OpenVINO can run bf16 natively on this CPU (AVX512-BF16 or AMX); False without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


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
        cache: bool = True,
        lazy: bool = True,
        _model: Any = None,
    ) -> None:
        ov = _import_openvino()
        dev = resolve_device("cpu" if device in (None, "auto") else device)
        if dev.type != "cpu":
            raise BackendError(f"the OpenVINO backend runs on the CPU here, not {dev}; use ONNX Runtime or TensorRT on GPUs")
        self.device = torch.device("cpu")
        if precision is not None and precision not in _HINT:
            raise BackendError(f"OpenVINO runs fp32 or bf16 (or int8 from a quantized IR) on the CPU, not {precision!r}")
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
        file_precision = meta.get("precision", "fp32")
        if file_precision == "int8":
            if precision not in (None, "int8"):
                raise BackendError(f"{self.path}: this IR is quantized to int8; run it as int8 (no --precision), or "
                                   f"the fp32 model for {precision}")
            precision = "int8"
        elif file_precision != "fp32":
            raise BackendError(
                f"{self.path}: OpenVINO takes the fp32 model and applies its own precision; this file is "
                f"{meta.get('precision')}: use the fp32 ONNX (x.onnx, not x.fp16.onnx)"
            )
        elif precision == "int8":
            raise BackendError(
                f"{self.path or self.model_id}: int8 runs from an int8-quantized OpenVINO IR; write one with "
                "medsr-export --openvino-int8 CALIBRATION_DIR (NNCF, calibrated on training images) and run that .xml"
            )
        precision = precision or "fp32"
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
        self._compiled = self._request = None
        #: compiled-model cache root for this model (None: caching off); see :func:`compile_cache_dir`
        key = (self.weights_sha256 or _file_key(self.path)) if cache and _cache_enabled() else ""
        self.cache_root: Path | None = compile_cache_dir(key) if key else None
        if not lazy:
            self._compile(None)  # dynamic: checks the model compiles and the precision holds, before any tile

    def compile_cache_for(self, shape: tuple[int, ...] | None) -> Path | None:
        """The CACHE_DIR OpenVINO uses for ``shape``: ``<cache root>/<precision>/<NxCxHxW | dynamic>``."""
        if self.cache_root is None:
            return None
        return self.cache_root / self.precision / ("x".join(str(v) for v in shape) if shape else "dynamic")

    def _compile(self, shape: tuple[int, ...] | None) -> None:
        """Compile for one static input shape (None: dynamic N/H/W), replacing the previous compilation, and
        check that OpenVINO kept the asked precision.

        Static shapes let OpenVINO plan and reuse intermediate buffers: for a 256-px tile of the default
        model 435 MB instead of 618 MB, and a few % faster. The tiler sends one full-tile shape for every
        image at least a tile large, so this compiles once (about 0.1-0.6 s, or a read of the cached blob);
        smaller images recompile. Compilation is lazy: the first tile compiles, not the constructor."""
        self._request = self._compiled = None  # free the previous plan's buffers first
        model = self._ov_model
        if shape is not None:
            model = model.clone()
            model.reshape(list(shape))
        config = dict(self._config)
        cache = self.compile_cache_for(shape)
        if cache is not None and _writable_dir(cache):
            config["CACHE_DIR"] = str(cache)
        try:
            self._compiled = self._core.compile_model(model, "CPU", config)
        except Exception as e:
            raise BackendError(f"{self.path or 'model'}: OpenVINO cannot compile the model: {e}") from e
        got = str(self._compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        want = _HINT["fp32" if self.precision == "int8" else self.precision]
        if want not in got.replace("float32", "f32").replace("bfloat16", "bf16"):
            self._compiled = None
            raise BackendError(f"OpenVINO compiled {got} although {self.precision} was asked; refusing a silent change")
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
    def from_module(cls, module: torch.nn.Module, meta: dict[str, str], *, cache: bool = True,
                    **kwargs: Any) -> OpenVINOBackend:
        """Convert a PyTorch model in memory (``openvino.convert_model``, dynamic N/H/W).

        With ``cache`` and a known ``meta["weights_sha256"]`` the converted model is kept as an IR in
        :func:`compile_cache_dir` (``model.xml``/``.bin``) and read from there next time: tracing and
        converting cost ~10 s on a 2-core CPU, reading the IR ~0.1 s."""
        ov = _import_openvino()
        sha = meta.get("weights_sha256", "")
        ir = compile_cache_dir(sha) / "model.xml" if cache and sha and _cache_enabled() else None
        if ir is not None and ir.is_file():
            try:
                ov_model = ov.Core().read_model(str(ir))
                if ir_metadata(ov_model, ir).get("weights_sha256") == sha:
                    return cls(None, _model=(ov_model, meta), cache=cache, **kwargs)
            except Exception:  # noqa: S110 - a damaged cache entry is rebuilt below
                pass
        d = module.descriptor  # type: ignore[attr-defined]
        m = d.size_multiple
        try:
            with telemetry_off():
                ov_model = ov.convert_model(
                    module.eval().float().cpu(), example_input=torch.rand(1, d.in_channels, 16 * m, 16 * m),
                    input=[ov.PartialShape([-1, d.in_channels, -1, -1])],
                )
        except Exception as e:
            raise BackendError(f"OpenVINO could not convert the model ({type(e).__name__}: {e})") from e
        _release_freed_heap()  # tracing leaves ~130 MB of freed heap that glibc keeps otherwise
        if ir is not None and _save_ir_atomic(ov, ov_model, meta, ir):
            # run what later loads will read: the IR's model, so its compiled blob is the one they find
            ov_model = ov.Core().read_model(str(ir))
        return cls(None, _model=(ov_model, meta), cache=cache, **kwargs)

    def tile_limits(self) -> TileLimits:
        return TileLimits(multiple=self.descriptor.size_multiple)

    @torch.no_grad()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != self.channels:
            raise BackendError(f"expected [N,{self.channels},h,w], got {tuple(batch.shape)}")
        x = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        if self._shape != x.shape or self._request is None:
            self._compile(tuple(x.shape))
        self._request.infer({0: x})
        y = self._request.get_output_tensor(0).data
        return finish_output(torch.from_numpy(np.array(y, dtype=np.float32, copy=True))).to(batch.device)

    def fallback(self) -> Backend | None:
        if self.precision == "fp32":
            return None
        return OpenVINOBackend(
            None, _model=(self._ov_model, self.metadata), precision="fp32", batch=self.preferred_batch,
            threads=self._threads, cache=self.cache_root is not None,
        )

    def close(self) -> None:
        self._request = None
        self._compiled = None


def compile_cache_dir(key: str) -> Path:
    """Where OpenVINO artefacts of one model live: ``<medsr cache>/openvino/<key[:16]>`` (key: the weights'
    sha256, else the model file's). Inside: ``model.xml``/``.bin`` (the converted model, weights only) and
    ``<precision>/<NxCxHxW>/`` (OpenVINO's CACHE_DIR for one tile shape: compiled blobs, which OpenVINO
    itself keys by the model's content, the device and the compile options, so a stale blob is never used).
    Caching is off with ``MEDSR_OPENVINO_CACHE=0``."""
    from medsr.weights.registry import cache_dir

    return cache_dir() / "openvino" / (key[:16] or "unknown")


def _cache_enabled() -> bool:
    return os.environ.get("MEDSR_OPENVINO_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _file_key(path: Path | None) -> str:
    """A content key for a model file without medsr metadata (sha256 of the file)."""
    if path is None or not path.is_file():
        return ""
    from medsr.fsutil import sha256_file

    return "file-" + sha256_file(path)


def _writable_dir(path: Path) -> bool:
    """Create ``path``; False (caching skipped, never an error) when the cache folder is not writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False


def _save_ir_atomic(ov: Any, model: Any, meta: dict[str, str], xml: Path) -> bool:
    """Save ``model`` (with medsr metadata) as ``xml``/``.bin``: written beside, renamed into place (bin first,
    so a reader that finds the xml finds its bin). Best effort (False when not saved): a read-only cache only
    costs the next start."""
    if not _writable_dir(xml.parent):
        return False
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.tmp.xml")
    try:
        clone = model.clone()
        set_ir_metadata(clone, meta)
        ov.save_model(clone, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
        return True
    except Exception:  # caching is best effort
        for p in (tmp, tmp.with_suffix(".bin")):
            p.unlink(missing_ok=True)
        return False


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
