"""OpenVINO IR export: the exported fp32 ONNX read by OpenVINO's ONNX frontend, saved as ``.xml`` + ``.bin``
with the engine contract's metadata in the IR's ``medsr`` rt_info block (read back by the OpenVINO backend).

The IR is optional: the OpenVINO backend also opens the ``.onnx`` directly. The IR skips the ONNX frontend at
start-up and keeps weights in fp32; OpenVINO applies the inference precision (fp32/bf16) when it compiles.
"""

from __future__ import annotations

from pathlib import Path

from medsr.runtime.backend import BackendError
from medsr.runtime.contract import read_onnx_metadata
from medsr.runtime.openvino_backend import set_ir_metadata


def export_openvino_ir(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """Convert an fp32 medsr ONNX to an OpenVINO IR at ``xml_path`` (``.bin`` beside it). Returns the path."""
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendError("OpenVINO is not installed (pip install 'medsr[cpu]')") from e
    onnx_path, xml_path = Path(onnx_path), Path(xml_path)
    meta = read_onnx_metadata(onnx_path)
    if meta.get("precision", "fp32") != "fp32":
        raise BackendError(f"{onnx_path}: export the IR from the fp32 ONNX; OpenVINO applies bf16 itself")
    model = ov.Core().read_model(str(onnx_path))
    set_ir_metadata(model, meta)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path
