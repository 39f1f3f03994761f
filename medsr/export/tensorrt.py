"""TensorRT engine builder (TensorRT 10 and 11) and the JSON sidecar written next to every engine.

The fp16 decision is baked into the ONNX (fp16 initializers and casts, see medsr.export.fp16):
TensorRT 11 networks are always strongly typed and have no FP16 builder flag; on TensorRT 10 the
network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` so the same ONNX builds
the same precisions on both. ``tensorrt`` is imported inside functions only.

Sidecar (``cxr_x4.plan`` -> ``cxr_x4.json``): plain JSON made by :func:`make_sidecar` from plain
data, so it is testable without TensorRT; :func:`check_sidecar` turns a GPU / TensorRT version /
scale mismatch into a BackendError that says how to rebuild.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsr.arch.descriptor import ModelDescriptor
from medsr.runtime.backend import BackendError, TileLimits

SIDECAR_FORMAT = 1
DEFAULT_WORKSPACE_GIB = 4.0
DEFAULT_OPT_LEVEL = 3

Shape = tuple[int, int, int, int]


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile for the NCHW input (LR tile shapes, halo included)."""

    min: Shape
    opt: Shape
    max: Shape

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileShapes:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))  # type: ignore[arg-type]

    def tile_limits(self, multiple: int = 1) -> TileLimits:
        return TileLimits(
            min_hw=(self.min[2], self.min[3]), max_hw=(self.max[2], self.max[3]), max_batch=self.max[0], multiple=multiple
        )


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def profile_for_tiles(
    descriptor: ModelDescriptor,
    *,
    tile: int = 256,
    overlap: int = 16,
    batch: int = 4,
    max_batch: int | None = None,
    min_hw: int | None = None,
) -> ProfileShapes:
    """Profile covering the tiled runtime's tiles (``TileConfig.tile`` already includes overlap and halo).

    The runtime sends tiles of at most ``tile``: with ``TileConfig.fit`` it shrinks them per image
    (never below the profile's min), so the profile is dynamic between min and max.

    opt = max = ``tile`` (rounded up to the size multiple), batch opt = ``batch``, max = ``max_batch``;
    min = ``min_hw`` (default: 2*overlap, at least 16) so smaller ``--tile`` values still run, batch 1.
    """
    m = descriptor.size_multiple
    full = _round_up(tile, m)
    lo = _round_up(min_hw if min_hw is not None else max(2 * overlap, 16), m)
    lo = min(lo, full)
    mb = max(batch, max_batch or batch)
    c = descriptor.in_channels
    return ProfileShapes((1, c, lo, lo), (batch, c, full, full), (mb, c, full, full))


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(engine_path).with_suffix(".json")


def make_sidecar(
    *,
    model_id: str,
    descriptor: ModelDescriptor,
    precision: str,
    profile: ProfileShapes,
    io: dict[str, dict[str, Any]],
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int] | list[int] | str,
    weights_sha256: str = "",
    onnx_file: str = "",
    onnx_sha256: str = "",
    build: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sidecar as plain JSON-able data. ``io``: ``{name: {"mode": "input"|"output", "dtype": "float32"}}``."""
    cc = compute_capability if isinstance(compute_capability, str) else ".".join(str(v) for v in compute_capability)
    return {
        "format": SIDECAR_FORMAT,
        "model_id": model_id,
        "scale": descriptor.scale,
        "channels": descriptor.in_channels,
        "size_multiple": descriptor.size_multiple,
        "descriptor": descriptor.to_dict(),
        "precision": precision,
        "io": io,
        "profile": ProfileShapes.to_dict(profile),
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": cc,
        "weights_sha256": weights_sha256,
        "onnx_file": onnx_file,
        "onnx_sha256": onnx_sha256,
        "build": build or {},
    }


def write_sidecar(engine_path: str | Path, data: dict[str, Any]) -> Path:
    p = sidecar_path(engine_path)
    p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return p


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    p = sidecar_path(engine_path)
    if not p.is_file():
        raise BackendError(
            f"{engine_path}: sidecar {p.name} is missing; rebuild the engine with medsr-export "
            "(it writes the engine and its sidecar together)"
        )
    try:
        data = json.loads(p.read_text())
        for k in ("model_id", "scale", "channels", "precision", "profile", "io", "tensorrt_version"):
            data[k]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError) as e:
        raise BackendError(f"{p}: corrupt engine sidecar ({type(e).__name__}: {e}); rebuild with medsr-export") from e
    return data


def rebuild_hint(data: dict[str, Any], engine_path: str | Path) -> str:
    onnx_file = data.get("onnx_file") or "<model>.onnx"
    return (
        f"rebuild it on this machine: medsr-export --recipe <recipe> -o {engine_path} "
        f"(or build from {onnx_file} with medsr.export.build_engine)"
    )


def check_sidecar(
    data: dict[str, Any],
    engine_path: str | Path,
    *,
    tensorrt_version: str | None = None,
    gpu_name: str | None = None,
    compute_capability: str | None = None,
    scale: int | None = None,
    channels: int | None = None,
) -> None:
    """Raise BackendError if the engine was built for another GPU / TensorRT, or a different scale."""
    hint = rebuild_hint(data, engine_path)
    if scale is not None and int(data["scale"]) != int(scale):
        raise BackendError(
            f"{engine_path}: engine is x{data['scale']} ({data['model_id']}) but x{scale} was requested; "
            f"use an x{scale} engine or {hint}"
        )
    if channels is not None and int(data["channels"]) != int(channels):
        raise BackendError(f"{engine_path}: engine takes {data['channels']} channels, not {channels}; {hint}")
    if tensorrt_version is not None and data["tensorrt_version"] != tensorrt_version:
        raise BackendError(
            f"{engine_path}: built with TensorRT {data['tensorrt_version']}, this is TensorRT {tensorrt_version}; "
            f"engines are not portable across TensorRT versions: {hint}"
        )
    if compute_capability is not None and str(data.get("compute_capability")) != str(compute_capability):
        raise BackendError(
            f"{engine_path}: built for {data.get('gpu_name')} (compute capability {data.get('compute_capability')}), "
            f"this GPU is {gpu_name} ({compute_capability}); engines are GPU-specific: {hint}"
        )


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
    from medsr.export.onnx_export import INPUT_NAME, descriptor_from_metadata, read_onnx_metadata, sha256_file

    ok, why = tensorrt_status()
    if not ok:
        raise BackendError(f"cannot build {engine_path}: {why}")
    import tensorrt as trt
    import torch

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
    config.set_timing_cache(cache, False)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    serialized_engine = builder.build_serialized_network(network, config)
    if serialized_engine is None:
        raise BackendError(f"TensorRT failed to build {engine_path} from {onnx_path} (see the TensorRT log above)")
    from medsr.io import atomic_write_path

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(engine_path) as tmp:  # never a half-written engine under the final name
        tmp.write_bytes(bytes(serialized_engine))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
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
    write_sidecar(engine_path, data)
    return data


def sidecar_from_dict(d: dict[str, Any]) -> tuple[ModelDescriptor, ProfileShapes]:
    return ModelDescriptor.from_dict(d["descriptor"]), ProfileShapes.from_dict(d["profile"])
