"""The engine contract: how an exported model or built engine describes itself to the runtime.

The runtime owns it and reads it; ``medsr.export`` writes it. Nothing here imports ``medsr.export``.

* defaults: tile, overlap, batch (one home: ``TileConfig``, recipes, profiles and backends use these);
* file kinds: which suffix opens which backend;
* ONNX: tensor names, ``medsr.*`` metadata fields, the fp32/fp16 file-name convention;
* TensorRT: the optimization profile over tile shapes and the JSON sidecar beside every ``.plan``;
* Triton: the tensor datatypes and the ``medsr.*`` model-config parameters a served model carries;
* output finishing: what every backend returns (float32 in [0, 1], NaN/Inf kept as NaN for the runtime's check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsr.arch.descriptor import ModelDescriptor
from medsr.runtime.backend import BackendError, TileLimits

# ----------------------------------------------------------------------------------- defaults

#: LR tile edge including overlap: large enough that the blend overhead is small, small enough for a
#: 4x RRDB batch on an 8 GB GPU. See docs/runtime.md for the seam curve behind overlap and halo.
DEFAULT_TILE = 256
#: LR pixels shared by neighbouring tiles (halo dropped at each interior edge + raised-cosine blend zone)
DEFAULT_OVERLAP = 32
#: tiles per backend call on a GPU when neither the caller nor the backend says otherwise
DEFAULT_BATCH = 4
#: tiles per call on the CPU: batching gains nothing there, and each tile's 4x activations (~0.2 GB per
#: feature map at tile 256) would multiply the peak memory
DEFAULT_CPU_BATCH = 1


def default_batch(device: torch.device | str) -> int:
    """The preferred batch of a backend on ``device``."""
    return DEFAULT_BATCH if torch.device(device).type == "cuda" else DEFAULT_CPU_BATCH


def default_overlap(tile: int) -> int:
    """The overlap when only a tile is given: :data:`DEFAULT_OVERLAP`, at most half the tile (a multiple of 4)."""
    return max(0, min(DEFAULT_OVERLAP, (tile // 2) // 4 * 4))


def default_halo(overlap: int) -> int:
    """LR pixels dropped at each interior tile edge before blending, when ``TileConfig.halo`` is None."""
    return overlap // 4


#: largest batch an exported engine profile accepts by default
DEFAULT_MAX_BATCH = 8

#: precisions a caller may ask for. ``fp32`` is true IEEE float32 (TF32 off on CUDA); ``tf32`` allows
#: TensorFloat-32 matmul/conv on Ampere+ GPUs; ``fp16``/``bf16`` as named; ``int8``: an int8-quantized
#: OpenVINO IR on the CPU (medsr-export --openvino-int8).
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8")

# ----------------------------------------------------------------------------------- file kinds

TRT_SUFFIXES = (".plan", ".engine")
ONNX_SUFFIXES = (".onnx",)
OPENVINO_SUFFIXES = (".xml",)
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".param")


def engine_kind(path: str | Path) -> str:
    """``tensorrt``, ``onnx``, ``openvino`` or ``weights`` (also for a suffix-less registry name)."""
    suffix = Path(path).suffix.lower()
    if suffix in TRT_SUFFIXES:
        return "tensorrt"
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in OPENVINO_SUFFIXES:
        return "openvino"
    if suffix in WEIGHT_SUFFIXES or not suffix:
        return "weights"
    raise BackendError(
        f"{path}: unknown model file type {suffix!r}; expected .plan/.engine (TensorRT), .onnx (ONNX Runtime), "
        ".xml (OpenVINO IR) or .pth/.safetensors/.param (PyTorch weights)"
    )


# ----------------------------------------------------------------------------------- ONNX

INPUT_NAME = "input"
OUTPUT_NAME = "output"
META_PREFIX = "medsr."


def fp16_path_for(fp32_path: str | Path) -> Path:
    """Name convention: ``cxr_x4.onnx`` (fp32) <-> ``cxr_x4.fp16.onnx`` (fp16)."""
    p = Path(fp32_path)
    return p.with_name(p.name[: -len(".onnx")] + ".fp16.onnx") if p.name.endswith(".onnx") else p.with_suffix(".fp16.onnx")


def fp32_path_for(fp16_path: str | Path) -> Path | None:
    """The fp32 sibling of ``x.fp16.onnx`` (``x.onnx``); None if the name does not follow the convention."""
    p = Path(fp16_path)
    if not p.name.endswith(".fp16.onnx"):
        return None
    return p.with_name(p.name[: -len(".fp16.onnx")] + ".onnx")


def onnx_metadata(
    descriptor: ModelDescriptor, *, model_id: str, precision: str, weights_sha256: str, **extra: str
) -> dict[str, str]:
    """The ``medsr.*`` metadata fields an exported ONNX carries (prefix not included)."""
    return {
        "model_id": model_id,
        "scale": str(descriptor.scale),
        "in_channels": str(descriptor.in_channels),
        "out_channels": str(descriptor.out_channels),
        "size_multiple": str(descriptor.size_multiple),
        "precision": precision,
        "io_dtype": "float32",
        "weights_sha256": weights_sha256,
        "descriptor": json.dumps(descriptor.to_dict(), sort_keys=True),
        **extra,
    }


def load_onnx_proto(path: str | Path) -> Any:
    """``onnx.load`` with a BackendError naming the file."""
    try:
        import onnx
    except ImportError as e:
        raise BackendError(f"{path}: reading ONNX needs the onnx package (pip install 'medsr[export]')") from e
    p = Path(path)
    if not p.is_file():
        raise BackendError(f"{p}: ONNX file not found")
    try:
        return onnx.load(str(p))
    except Exception as e:  # protobuf DecodeError and friends
        raise BackendError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e}); re-export it with medsr-export") from e


def metadata_from_map(props: dict[str, str]) -> dict[str, str]:
    """The ``medsr.*`` entries of a metadata map, prefix stripped."""
    return {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``medsr.*`` metadata of an exported model, prefix stripped. BackendError if unreadable."""
    proto = load_onnx_proto(path)
    return metadata_from_map({p.key: p.value for p in proto.metadata_props})


def descriptor_from_metadata(meta: dict[str, str], path: str | Path) -> ModelDescriptor:
    if "descriptor" not in meta:
        raise BackendError(
            f"{path}: no medsr metadata (model id, scale, channels): export it with medsr-export "
            "or medsr.export.export_onnx"
        )
    try:
        return ModelDescriptor.from_dict(json.loads(meta["descriptor"]))
    except (ValueError, KeyError, TypeError) as e:
        raise BackendError(f"{path}: corrupt medsr metadata ({type(e).__name__}: {e}); re-export it") from e


# ----------------------------------------------------------------------------------- TensorRT profile

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
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch: int = DEFAULT_BATCH,
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


# ----------------------------------------------------------------------------------- TensorRT sidecar

SIDECAR_FORMAT = 1
#: oldest TensorRT whose API the builder and backend are written against
MIN_TENSORRT_MAJOR = 10


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
    """Write the sidecar atomically (never a half-written JSON beside an engine)."""
    from medsr.fsutil import atomic_write_path

    p = sidecar_path(engine_path)
    with atomic_write_path(p) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
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


def sidecar_from_dict(d: dict[str, Any]) -> tuple[ModelDescriptor, ProfileShapes]:
    return ModelDescriptor.from_dict(d["descriptor"]), ProfileShapes.from_dict(d["profile"])


def check_tensorrt_version(version: str) -> None:
    """BackendError for TensorRT older than :data:`MIN_TENSORRT_MAJOR` (the API used here is 10+)."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise BackendError(f"cannot parse the TensorRT version {version!r}") from None
    if major < MIN_TENSORRT_MAJOR:
        raise BackendError(
            f"TensorRT {version} is too old: medsr needs TensorRT {MIN_TENSORRT_MAJOR} or newer "
            "(named I/O tensors, execute_async_v3, build_serialized_network)"
        )


# ----------------------------------------------------------------------------------- Triton

#: Triton (KServe v2) datatypes of the I/O dtypes a medsr model may carry; config.pbtxt spells them
#: ``TYPE_<datatype>``. The Triton client sends and receives tiles in the served model's own datatype.
TRITON_DATATYPES = {"float32": "FP32", "float16": "FP16"}


def triton_parameters(meta: dict[str, str]) -> dict[str, str]:
    """The config.pbtxt ``parameters`` of a served model: its ``medsr.*`` metadata, prefix kept, so a client
    learns scale, channels, precision, model id and weights sha256 from the server's model configuration
    (read back with :func:`metadata_from_map`)."""
    return {META_PREFIX + k: v for k, v in meta.items()}


# ----------------------------------------------------------------------------------- output


def finish_output(y: torch.Tensor) -> torch.Tensor:
    """Every backend's output convention: float32 clamped to [0, 1]; NaN/Inf returned as NaN, so the tiled
    runtime sees them and re-runs the tile on the backend's fallback."""
    y = y.float()
    nan = float("nan")
    return torch.nan_to_num(y, nan=nan, posinf=nan, neginf=nan).clamp_(0.0, 1.0)
