"""Triton Inference Server model repository for an exported model.

::

    REPO/<name>/config.pbtxt          platform, I/O, max_batch_size, dynamic batching, instance group,
                                      version policy, the model's medsr.* metadata as parameters
    REPO/<name>/<version>/model.onnx  (platform onnxruntime_onnx)  or  model.plan (tensorrt_plan)

config.pbtxt is generated from the model's engine contract (ONNX metadata and graph I/O, or the TensorRT
sidecar): tensor names ``input``/``output``, dims ``[C, -1, -1]`` (batch implicit, H/W dynamic), the graph's
own I/O datatype (fp32 for medsr's fp32 and fp16 exports, whose casts are inside the graph). When
tritonclient is installed the text is parsed into Triton's ``ModelConfig`` protobuf before anything is
written. The model directory appears complete or not at all (staged beside it, then renamed); an existing
version is never replaced unless asked.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsr.runtime.backend import BackendError
from medsr.runtime.contract import (
    DEFAULT_BATCH,
    DEFAULT_MAX_BATCH,
    INPUT_NAME,
    OUTPUT_NAME,
    TRITON_DATATYPES,
    TRT_SUFFIXES,
    descriptor_from_metadata,
    fp32_path_for,
    load_onnx_proto,
    metadata_from_map,
    onnx_metadata,
    read_sidecar,
    sidecar_from_dict,
    triton_parameters,
)

#: platform -> (config.pbtxt platform, model file name inside the version directory)
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
#: how long the dynamic batcher waits to fill a preferred batch; small against one tile's compute (tens
#: of ms on a GPU for the x4 RRDB), long enough to merge the tiles that concurrent clients send
DEFAULT_QUEUE_DELAY_US = 2000
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_ONNX_DTYPES = {1: "float32", 10: "float16"}  # onnx.TensorProto.FLOAT / FLOAT16


@dataclass(frozen=True)
class TritonConfig:
    """Everything config.pbtxt says, as plain data (rendered by :func:`render_config`)."""

    name: str
    platform: str  # "onnx" | "tensorrt"
    io_dtype: str  # "float32" | "float16"
    scale: int
    in_channels: int
    out_channels: int
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    kind: str = "gpu"
    instances: int = 1
    version: int = 1
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    tile_hw: tuple[int, int] | None = None  # fixed LR tile shape (a static engine); None: dynamic H/W
    parameters: dict[str, str] = field(default_factory=dict)
    comment: str = ""


@dataclass(frozen=True)
class TritonExport:
    """What :func:`export_triton` wrote."""

    model_dir: Path
    config_path: Path
    model_path: Path
    config: TritonConfig
    #: True when the text was parsed into tritonclient's ModelConfig protobuf (False: tritonclient missing)
    validated: bool


def check_name(name: str) -> str:
    """A Triton model name usable as a directory name (letters, digits, ``_ . -``; not hidden)."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"Triton model name {name!r}: use letters, digits, '_', '.' and '-' (not starting with '.' or '-')")
    return name


def _q(s: str) -> str:
    """A protobuf text-format string literal."""
    esc = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{esc}"'


def render_config(cfg: TritonConfig) -> str:
    """config.pbtxt text (protobuf text format of Triton's ``ModelConfig``)."""
    platform = PLATFORMS[cfg.platform][0]
    dtype = "TYPE_" + TRITON_DATATYPES[cfg.io_dtype]
    h, w = cfg.tile_hw if cfg.tile_hw else (-1, -1)
    oh, ow = (h * cfg.scale, w * cfg.scale) if cfg.tile_hw else (-1, -1)
    lines = [f"# {line}" for line in cfg.comment.splitlines()] if cfg.comment else []
    lines += [
        f"name: {_q(cfg.name)}",
        f"platform: {_q(platform)}",
        f"max_batch_size: {cfg.max_batch_size}",
        "input [",
        f"  {{ name: {_q(INPUT_NAME)} data_type: {dtype} dims: [ {cfg.in_channels}, {h}, {w} ] }}",
        "]",
        "output [",
        f"  {{ name: {_q(OUTPUT_NAME)} data_type: {dtype} dims: [ {cfg.out_channels}, {oh}, {ow} ] }}",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in cfg.preferred_batch_sizes)} ]",
        f"  max_queue_delay_microseconds: {cfg.queue_delay_us}",
        "}",
        "instance_group [",
        f"  {{ count: {cfg.instances} kind: {KINDS[cfg.kind]} }}",
        "]",
        # serve exactly the version this config describes (its parameters are that version's metadata)
        f"version_policy: {{ specific: {{ versions: [ {cfg.version} ] }} }}",
    ]
    for k in sorted(cfg.parameters):
        lines.append(f"parameters {{ key: {_q(k)} value: {{ string_value: {_q(cfg.parameters[k])} }} }}")
    return "\n".join(lines) + "\n"


def validate_config(text: str) -> Any | None:
    """Parse config.pbtxt into tritonclient's ``ModelConfig`` protobuf; None when tritonclient is not
    installed. BackendError when the text does not parse."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    msg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        raise BackendError(f"generated config.pbtxt is not a valid Triton ModelConfig: {e}") from e
    return msg


def _batch_sizes(batch: int, max_batch: int) -> tuple[int, ...]:
    return tuple(sorted({min(batch, max_batch), max_batch}))


def config_for_onnx(
    path: str | Path, name: str, *, batch: int = DEFAULT_BATCH, max_batch: int = DEFAULT_MAX_BATCH, **kw: Any
) -> TritonConfig:
    """The Triton config of a medsr ONNX: I/O dtype from the graph, descriptor and parameters from its metadata."""
    p = Path(path)
    proto = load_onnx_proto(p)
    meta = metadata_from_map({m.key: m.value for m in proto.metadata_props})
    desc = descriptor_from_metadata(meta, p)
    ins = {i.name: i for i in proto.graph.input}
    outs = {o.name: o for o in proto.graph.output}
    if INPUT_NAME not in ins or OUTPUT_NAME not in outs:
        raise BackendError(f"{p}: expected an input {INPUT_NAME!r} and an output {OUTPUT_NAME!r}; re-export it with medsr-export")
    dtypes = {_ONNX_DTYPES.get(t.type.tensor_type.elem_type) for t in (ins[INPUT_NAME], outs[OUTPUT_NAME])}
    if len(dtypes) != 1 or None in dtypes:
        raise BackendError(f"{p}: input and output must both be float32 or both float16 for Triton")
    return TritonConfig(
        name=name, platform="onnx", io_dtype=dtypes.pop(), scale=desc.scale, in_channels=desc.in_channels, out_channels=desc.out_channels,
        max_batch_size=max_batch, preferred_batch_sizes=_batch_sizes(batch, max_batch), parameters=triton_parameters(meta),
        comment=f"medsr: {meta.get('model_id', p.stem)} x{desc.scale}, {meta.get('precision', 'fp32')}, from {p.name}", **kw,
    )


def config_for_plan(
    path: str | Path, name: str, *, batch: int = DEFAULT_BATCH, max_batch: int | None = None, **kw: Any
) -> TritonConfig:
    """The Triton config of a TensorRT engine from its sidecar; max_batch_size is the profile's max batch
    (at most ``max_batch``), the tile shape fixed when the profile is."""
    p = Path(path)
    side = read_sidecar(p)
    desc, prof = sidecar_from_dict(side)
    dtypes = {str(v.get("dtype", "float32")) for v in side["io"].values()}
    if len(dtypes) != 1 or not dtypes <= set(TRITON_DATATYPES):
        raise BackendError(f"{p}: engine I/O dtypes {sorted(dtypes)} are not one of {sorted(TRITON_DATATYPES)}")
    mb = prof.max[0] if max_batch is None else min(max_batch, prof.max[0])
    fixed = (prof.min[2], prof.min[3]) == (prof.max[2], prof.max[3])
    meta = onnx_metadata(desc, model_id=side["model_id"], precision=side["precision"],
                         weights_sha256=side.get("weights_sha256", ""), tensorrt_version=side["tensorrt_version"],
                         gpu_name=side.get("gpu_name", ""), compute_capability=str(side.get("compute_capability", "")))
    io_dtype = next(iter(dtypes))
    meta["io_dtype"] = io_dtype
    return TritonConfig(
        name=name, platform="tensorrt", io_dtype=io_dtype, scale=desc.scale, in_channels=desc.in_channels, out_channels=desc.out_channels,
        max_batch_size=mb, preferred_batch_sizes=_batch_sizes(min(batch, mb), mb),
        tile_hw=(prof.max[2], prof.max[3]) if fixed else None, parameters=triton_parameters(meta),
        comment=(f"medsr: {side['model_id']} x{desc.scale}, {side['precision']}, from {p.name}: TensorRT "
                 f"{side['tensorrt_version']} on {side.get('gpu_name')}; the Triton server must run the same TensorRT "
                 "version on the same GPU model"), **kw,
    )


def default_name(path: str | Path) -> str:
    """``cxr_x4.fp16.onnx`` / ``cxr_x4.onnx`` / ``cxr_x4.plan`` -> ``cxr_x4``."""
    p = Path(path)
    stem = (fp32_path_for(p) or p).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".-") or "model"


def export_triton(
    model_path: str | Path,
    repo: str | Path,
    *,
    name: str | None = None,
    version: int = 1,
    batch: int = DEFAULT_BATCH,
    max_batch: int | None = None,
    kind: str = "gpu",
    instances: int = 1,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    overwrite: bool = False,
) -> TritonExport:
    """Write ``repo/<name>/config.pbtxt`` and ``repo/<name>/<version>/model.onnx`` (or ``model.plan``).

    ``model_path``: a medsr ONNX (fp32 or fp16) or a TensorRT ``.plan`` with its sidecar. ``max_batch``:
    Triton's max_batch_size (default: :data:`DEFAULT_MAX_BATCH`, a plan's profile max); ``batch`` the
    smaller preferred batch. FileExistsError when the version exists and ``overwrite`` is False.
    """
    src = Path(model_path)
    name = check_name(name or default_name(src))
    if version < 1:
        raise ValueError(f"Triton model versions start at 1, got {version}")
    if kind not in KINDS:
        raise ValueError(f"instance kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if instances < 1 or batch < 1 or (max_batch is not None and max_batch < 1):
        raise ValueError("instances, batch and max_batch must be >= 1")
    kw: dict[str, Any] = {"kind": kind, "instances": instances, "version": version, "queue_delay_us": queue_delay_us}
    if src.suffix.lower() in TRT_SUFFIXES:
        cfg = config_for_plan(src, name, batch=batch, max_batch=max_batch, **kw)
    else:
        cfg = config_for_onnx(src, name, batch=batch, max_batch=max_batch or DEFAULT_MAX_BATCH, **kw)
    text = render_config(cfg)
    validated = validate_config(text) is not None

    repo = Path(repo)
    model_dir = repo / name
    vdir = model_dir / str(version)
    filename = PLATFORMS[cfg.platform][1]
    if vdir.exists() and not overwrite:
        raise FileExistsError(
            f"{vdir}: Triton model {name!r} version {version} exists; export as another version "
            f"(Triton serves the version config.pbtxt names) or replace it explicitly"
        )
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.medsr-", dir=repo))
    try:
        (staging / str(version)).mkdir()
        _copy_synced(src, staging / str(version) / filename)
        (staging / "config.pbtxt").write_text(text)
        _fsync(staging / "config.pbtxt")
        if not model_dir.exists():
            os.rename(staging, model_dir)  # a new model appears complete, in one step
        else:
            if vdir.exists():  # overwrite: swap the version directory, the old one is removed below
                os.rename(vdir, staging / "replaced")
            os.rename(staging / str(version), vdir)
            os.replace(staging / "config.pbtxt", model_dir / "config.pbtxt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TritonExport(model_dir, model_dir / "config.pbtxt", vdir / filename, cfg, validated)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    _fsync(dst)
