"""INT8 for the CPU: NNCF post-training quantization of the OpenVINO model, calibrated on real image crops.

``export_int8_ir(source, xml, calibration_dir)`` reads an fp32 medsr ONNX / IR (or converts weights), runs
``nncf.quantize`` on crops of the images in ``calibration_dir`` (training data, never the evaluation set),
and saves an IR whose ``medsr`` rt_info says ``precision = int8`` (plus how it was calibrated). The OpenVINO
backend runs such an IR as precision ``int8`` (quantized convolutions in int8, the rest in fp32) without
NNCF installed. Whether int8 is good enough to be the automatic CPU choice is data, not a feature check:
see :data:`medsr.runtime.engines.INT8_VERDICT`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medsr.runtime.backend import BackendError

#: calibration defaults: LR crops of CALIB_SIZE px, CALIB_COUNT of them (NNCF's subset_size)
CALIB_SIZE = 64
CALIB_COUNT = 300


def calibration_crops(folder: str | os.PathLike[str], *, channels: int, size: int = CALIB_SIZE,
                      count: int = CALIB_COUNT, seed: int = 0) -> list[np.ndarray]:
    """``count`` random ``size`` x ``size`` crops of the images in ``folder`` (sorted, round robin), as
    ``[1, channels, size, size]`` float32 in [0, 1]; gray images are replicated for 3-channel models, RGB
    averaged for 1-channel ones. Crops lying entirely in the flat background (std < 1/255) are skipped."""
    import cv2

    from medsr.io import is_supported
    from medsr.pixels import array_to_unit

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_supported(p))
    if not files:
        raise BackendError(f"{folder}: no images to calibrate on")
    rng = np.random.default_rng(seed)
    imgs: list[np.ndarray] = []
    for p in files:
        a = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if a is None or min(a.shape[:2]) < size:
            continue
        x = array_to_unit(a)
        x = x[..., None] if x.ndim == 2 else x[..., ::-1]  # BGR -> RGB
        if x.shape[2] != channels:
            x = np.repeat(x[..., :1], channels, axis=2) if channels == 3 else x.mean(axis=2, keepdims=True)
        imgs.append(np.ascontiguousarray(x, dtype=np.float32))
    if not imgs:
        raise BackendError(f"{folder}: no image at least {size} px large to calibrate on")
    out: list[np.ndarray] = []
    tries = 0
    while len(out) < count and tries < 20 * count:
        img = imgs[tries % len(imgs)]
        tries += 1
        y = int(rng.integers(0, img.shape[0] - size + 1))
        x0 = int(rng.integers(0, img.shape[1] - size + 1))
        crop = img[y:y + size, x0:x0 + size]
        if crop.std() < 1 / 255:
            continue
        out.append(np.ascontiguousarray(crop.transpose(2, 0, 1)[None]))
    return out


#: convolutions kept in fp32 by default (regex on OpenVINO op names): the first conv (sees the raw image),
#: the upsampling and HR convolutions and the last one (write the output pixels; a quantization step there
#: is an error in every output pixel)
KEEP_FP32 = (r".*conv_first.*", r".*conv_up.*", r".*conv_hr.*", r".*conv_last.*")


def quantize_model(ov_model: Any, crops: list[np.ndarray], *, keep_fp32: tuple[str, ...] = KEEP_FP32,
                   mixed: bool = True, fast_bias_correction: bool = True) -> Any:
    """``nncf.quantize`` of an OpenVINO model on ``crops`` (all of them: subset_size = len(crops)); ``mixed``:
    asymmetric activation quantization (LeakyReLU outputs and the residual sums are not symmetric around 0);
    ``keep_fp32``: op-name patterns left unquantized."""
    from medsr.runtime.openvino_backend import telemetry_off

    with telemetry_off():  # NNCF reports usage through openvino_telemetry unless declined
        try:
            import nncf
        except ImportError as e:
            raise BackendError("int8 quantization needs NNCF (pip install 'medsr[cpu]' or pip install nncf)") from e

        def items() -> Iterator[np.ndarray]:
            yield from crops

        return nncf.quantize(
            ov_model, nncf.Dataset(list(items())), subset_size=len(crops), fast_bias_correction=fast_bias_correction,
            preset=nncf.QuantizationPreset.MIXED if mixed else nncf.QuantizationPreset.PERFORMANCE,
            ignored_scope=nncf.IgnoredScope(patterns=list(keep_fp32), validate=False) if keep_fp32 else None,
        )


def export_int8_ir(source: str | os.PathLike[str] | Any, xml_path: str | os.PathLike[str],
                   calibration_dir: str | os.PathLike[str], *, size: int = CALIB_SIZE, count: int = CALIB_COUNT,
                   seed: int = 0) -> Path:
    """Quantize ``source`` (an fp32 medsr ``.onnx``/``.xml``, or a weights spec: registered name or file) to
    int8 on crops of ``calibration_dir`` and save the IR at ``xml_path`` (``.bin`` beside it)."""
    import openvino as ov

    from medsr.runtime.contract import descriptor_from_metadata, engine_kind, read_onnx_metadata
    from medsr.runtime.openvino_backend import OpenVINOBackend, ir_metadata, set_ir_metadata

    core = ov.Core()
    src = str(source)
    kind = engine_kind(src)
    if kind == "onnx":
        meta = read_onnx_metadata(src)
        model = core.read_model(src)
    elif kind == "openvino":
        model = core.read_model(src)
        meta = ir_metadata(model, Path(src))
    elif kind == "weights":
        from medsr.runtime.contract import onnx_metadata
        from medsr.weights import load_model

        lm = load_model(src)
        meta = onnx_metadata(lm.descriptor, model_id=lm.model_id, precision="fp32", weights_sha256=lm.sha256)
        b = OpenVINOBackend.from_module(lm.model, meta, cache=False)
        model = b._ov_model
    else:
        raise BackendError(f"{src}: int8 export starts from an fp32 .onnx, .xml or weights, not a {kind} engine")
    if meta.get("precision", "fp32") != "fp32":
        raise BackendError(f"{src}: quantize the fp32 model, this one is {meta.get('precision')}")
    desc = descriptor_from_metadata(meta, src)
    crops = calibration_crops(calibration_dir, channels=desc.in_channels, size=size, count=count, seed=seed)
    q = quantize_model(model, crops)
    import nncf

    meta = {**meta, "precision": "int8", "calibration": f"{Path(calibration_dir).name}: {len(crops)} crops of "
            f"{size}x{size} (seed {seed}), nncf {nncf.__version__}"}
    set_ir_metadata(q, meta)
    xml = Path(xml_path)
    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(q, str(xml), compress_to_fp16=False)
    return xml


def synthetic_crops_dir(folder: str | os.PathLike[str], *, count: int = 4, size: int = 256) -> Path:
    """``count`` synthetic 16-bit radiographs (medsr.bench.measure.synthetic_radiograph) as PNGs in ``folder``:
    calibration images for tests and the benchmark, where no training set is at hand."""
    import cv2

    from medsr.bench.measure import synthetic_radiograph

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(d / f"synthetic_{i}.png"), np.rint(synthetic_radiograph(size, size, seed=i) * 65535)
                    .astype(np.uint16))
    return d


def int8_path_for(path: str | os.PathLike[str]) -> Path:
    """Name convention: ``cxr_x4.xml`` / ``cxr_x4.onnx`` -> ``cxr_x4.int8.xml``."""
    p = Path(path)
    return p.with_name(p.name.rsplit(".", 1)[0] + ".int8.xml")
