"""TensorRT engine builder (TensorRT 10 and 11) and the JSON sidecar written next to every engine.

The fp16 decision is baked into the ONNX (fp16 initializers and casts, see medsr.export.fp16):
TensorRT 11 networks are always strongly typed and have no FP16 builder flag; on TensorRT 10 the
network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` so the same ONNX builds
the same precisions on both. ``tensorrt`` is imported inside functions only.

The sidecar (``cxr_x4.plan`` -> ``cxr_x4.json``) and the profile are the runtime's engine contract
(:mod:`medsr.runtime.contract`); this module writes them. Not executed on this project's machines: no
TensorRT builder is installable here; the code is checked against the TensorRT 10 and 11 Python APIs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medsr.fsutil import atomic_write_path, sha256_file
from medsr.runtime.backend import BackendError
from medsr.runtime.contract import (
    INPUT_NAME,
    ProfileShapes,
    check_tensorrt_version,
    descriptor_from_metadata,
    make_sidecar,
    read_onnx_metadata,
    sidecar_path,
    write_sidecar,
)

DEFAULT_WORKSPACE_GIB = 4.0
DEFAULT_OPT_LEVEL = 3


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable and a CUDA GPU present."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken stub wheel raising at import
        return False, f"TensorRT is not installed or not importable ({type(e).__name__}: {e})"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, f"TensorRT {trt.__version__} is installed but no CUDA GPU is available"
    except Exception as e:  # pragma: no cover
        return False, f"cannot query CUDA: {e}"
    return True, f"TensorRT {trt.__version__}"


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def dtype_name(trt: Any, dt: Any) -> str:
    table = {trt.float32: "float32", trt.float16: "float16", trt.int32: "int32", trt.int8: "int8"}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = "bfloat16"
    return table.get(dt, str(dt))


def _create_network(trt: Any, builder: Any) -> Any:
    """Strongly typed network: TensorRT 11 always; TensorRT 10 with the STRONGLY_TYPED flag."""
    flags = 0
    flag_enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if trt_major(trt) < 11 and flag_enum is not None and hasattr(flag_enum, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    profile: ProfileShapes,
    model_id: str | None = None,
    weights_sha256: str | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    opt_level: int = DEFAULT_OPT_LEVEL,
    timing_cache: str | Path | None = None,
    log_level: str = "WARNING",
) -> dict[str, Any]:
    """Parse ``onnx_path``, build with one optimization profile, write the engine and its sidecar.

    ``timing_cache``: file loaded before and saved after the build (default ``<engine dir>/timing.cache``),
    so rebuilds and other models on the same GPU reuse tactic timings. Returns the sidecar data.
    """
    ok, why = tensorrt_status()
    if not ok:
        raise BackendError(f"cannot build {engine_path}: {why}")
    import tensorrt as trt
    import torch

    check_tensorrt_version(trt.__version__)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta = read_onnx_metadata(onnx_path)
    desc = descriptor_from_metadata(meta, onnx_path)
    t0 = time.perf_counter()
    logger = trt.Logger(getattr(trt.Logger, log_level, trt.Logger.WARNING))
    builder = trt.Builder(logger)
    network = _create_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path}: TensorRT could not parse the ONNX: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = int(opt_level)
    cache_file = Path(timing_cache) if timing_cache else engine_path.parent / "timing.cache"
    cache_bytes = cache_file.read_bytes() if cache_file.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):  # False: a cache from another GPU/TensorRT is refused
        raise BackendError(
            f"{cache_file}: the timing cache does not match this GPU or TensorRT version; delete it "
            "(or pass another timing_cache) and build again"
        )
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    serialized_engine = builder.build_serialized_network(network, config)
    if serialized_engine is None:
        raise BackendError(f"TensorRT failed to build {engine_path} from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(cache_file) as tmp:  # a concurrent build never reads a half-written cache
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    io: dict[str, dict[str, Any]] = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io[t.name] = {"mode": "input", "dtype": dtype_name(trt, t.dtype)}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io[t.name] = {"mode": "output", "dtype": dtype_name(trt, t.dtype)}
    data = make_sidecar(
        model_id=model_id or meta.get("model_id", onnx_path.stem),
        descriptor=desc,
        precision=meta.get("precision", "fp32"),
        profile=profile,
        io=io,
        tensorrt_version=trt.__version__,
        gpu_name=torch.cuda.get_device_name(),
        compute_capability=torch.cuda.get_device_capability(),
        weights_sha256=weights_sha256 if weights_sha256 is not None else meta.get("weights_sha256", ""),
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        build={
            "workspace_gib": workspace_gib,
            "builder_optimization_level": opt_level,
            "timing_cache": str(cache_file),
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    # the engine lands under its name only together with its sidecar: sidecar first, then the engine
    write_sidecar(engine_path, data)
    try:
        with atomic_write_path(engine_path) as tmp:  # never a half-written engine under the final name
            tmp.write_bytes(bytes(serialized_engine))
    except BaseException:
        sidecar_path(engine_path).unlink(missing_ok=True)
        raise
    return data
