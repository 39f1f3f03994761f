"""Weights: registry of named models, cache directory, download-and-verify, loading, ncnn import.

Heavy modules (torch, safetensors) are imported when a model is loaded, not on import.
"""

from __future__ import annotations

from medsr.weights.download import download, sha256_file
from medsr.weights.errors import MissingWeightsError, WeightsError
from medsr.weights.load import LoadedModel, check_spec, load_model, save_weights
from medsr.weights.ncnn import import_ncnn
from medsr.weights.registry import DEFAULT_MODEL, MODELS, RETINA_MODEL, ModelEntry, cache_dir, is_shipped

__all__ = [
    "RETINA_MODEL",
    "is_shipped",
    "DEFAULT_MODEL",
    "MODELS",
    "LoadedModel",
    "MissingWeightsError",
    "ModelEntry",
    "WeightsError",
    "check_spec",
    "cache_dir",
    "download",
    "import_ncnn",
    "load_model",
    "save_weights",
    "sha256_file",
]
