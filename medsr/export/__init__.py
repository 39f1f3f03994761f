"""Export: ONNX (fp32 / fp16) with built-in parity checks, and TensorRT engines with JSON sidecars.

Export writes the runtime's engine contract (:mod:`medsr.runtime.contract`); the runtime never imports export.

onnx, onnxruntime and tensorrt are imported lazily inside functions, so importing this package
(and the CLIs) never needs them.
"""

from __future__ import annotations

from medsr.export.onnx_export import OnnxExport, check_onnx, export_onnx
from medsr.export.parity import ParityError, ParityReport, check_parity
from medsr.export.recipes import Recipe, get_recipe, list_recipes
from medsr.export.tensorrt import build_engine, tensorrt_status

# the engine contract (names, metadata, profile, sidecar) lives in the runtime; re-exported for convenience
from medsr.runtime.contract import (
    INPUT_NAME,
    OUTPUT_NAME,
    ProfileShapes,
    fp16_path_for,
    fp32_path_for,
    make_sidecar,
    profile_for_tiles,
    read_onnx_metadata,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxExport",
    "ParityError",
    "ParityReport",
    "ProfileShapes",
    "Recipe",
    "build_engine",
    "check_onnx",
    "check_parity",
    "export_onnx",
    "fp16_path_for",
    "fp32_path_for",
    "get_recipe",
    "list_recipes",
    "make_sidecar",
    "profile_for_tiles",
    "read_onnx_metadata",
    "read_sidecar",
    "sidecar_path",
    "tensorrt_status",
    "write_sidecar",
]
