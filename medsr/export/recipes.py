"""Export recipes: which model, channel fold, tile profile and output name.

Single source of truth: the ``export/*.toml`` files at the repository top level. An installed package
(no repo checkout) uses :data:`BUILTIN` (the same recipes, defaults left implicit); a test asserts both
resolve to the same :class:`Recipe`.
Set ``MEDSR_RECIPES`` to a folder to use other recipes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medsr.runtime.contract import DEFAULT_BATCH, DEFAULT_MAX_BATCH, DEFAULT_OVERLAP, DEFAULT_TILE

DEFAULT_RECIPE = "cxr_x4"

# What each recipe sets beyond the Recipe defaults (the runtime's tile/overlap/batch defaults, max_batch,
# opset 18, fp16). The export/*.toml files spell every field out; a test asserts both resolve alike.
BUILTIN: dict[str, dict[str, Any]] = {
    "cxr_x4": {
        "description": "Chest X-ray, x4: medsr-cxr-x4, the shipped gray fidelity model (gray in, gray out)",
        "model": "medsr-cxr-x4",
        "channels": 1,
        "scale": 4,
        "output": "engines/cxr_x4.plan",
    },
    "retina_x2": {
        "description": "Retina fundus photographs, x2: medsr-retina-x2, the shipped RGB fidelity model",
        "model": "medsr-retina-x2",
        "channels": 3,
        "scale": 2,
        "output": "engines/retina_x2.plan",
    },
    "realesrgan_x4plus": {
        "description": "Real-ESRGAN x4plus as released, RGB, x4",
        "model": "realesrgan-x4plus",
        "channels": 3,
        "scale": 4,
        "output": "engines/realesrgan_x4plus.plan",
    },
}


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    channels: int
    scale: int
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch: int = DEFAULT_BATCH
    max_batch: int = DEFAULT_MAX_BATCH
    opset: int = 18
    fp16: bool = True
    output: str = ""
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipes_dir() -> Path | None:
    env = os.environ.get("MEDSR_RECIPES")
    if env:
        return Path(env)
    top = Path(__file__).resolve().parents[2] / "export"
    return top if top.is_dir() and any(top.glob("*.toml")) else None


def _raw() -> dict[str, dict[str, Any]]:
    import tomllib

    d = recipes_dir()
    if d is None:
        return {k: dict(v) for k, v in BUILTIN.items()}
    out = {}
    for f in sorted(d.glob("*.toml")):
        with open(f, "rb") as fh:
            out[f.stem] = tomllib.load(fh)
    return out


def list_recipes() -> list[str]:
    return sorted(_raw())


def get_recipe(name: str) -> Recipe:
    raw = _raw()
    key = name.removesuffix(".toml")
    if key not in raw:
        raise KeyError(f"unknown export recipe {name!r}; known: {', '.join(sorted(raw))}")
    fields = Recipe.__dataclass_fields__
    data = {k: v for k, v in raw[key].items() if k in fields}
    unknown = set(raw[key]) - set(fields)
    if unknown:
        raise ValueError(f"recipe {key}: unknown keys {sorted(unknown)}")
    return Recipe(name=key, **data)
