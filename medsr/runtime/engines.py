"""``open_backend(path)``: pick the backend from the file type (:func:`medsr.runtime.contract.engine_kind`).

``.plan`` / ``.engine`` -> TensorRT; ``.onnx`` -> ONNX Runtime (or OpenVINO with ``runtime="openvino"``);
``.xml`` -> OpenVINO IR; ``.pth`` / ``.pt`` / ``.safetensors`` / ``.param`` (or a registry name) -> PyTorch
via ``medsr.weights.load_model`` (or OpenVINO with ``runtime="openvino"``).

``precision``: None = the file's own (fp32 for weights). An ONNX model or engine carries its precision
(fp16 is baked in at export): asking for another one opens the sibling file of that precision when it
exists (``x.onnx`` <-> ``x.fp16.onnx``) and is refused otherwise; it is never silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsr.runtime.backend import Backend, BackendError
from medsr.runtime.contract import PRECISIONS, engine_kind, fp16_path_for, fp32_path_for

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")


def auto_runtime(path: str | os.PathLike[str], device: str | Any = "auto", precision: str | None = None) -> str:
    """What ``runtime="auto"`` runs: the file type's engine, except weights on the CPU, which run on OpenVINO
    (the fastest CPU path within 0.5/255 of PyTorch fp32, see docs/benchmarks.md) when it is installed."""
    from medsr.runtime.backend import resolve_device

    kind = engine_kind(path)
    if kind != "weights":
        return {"tensorrt": "tensorrt", "onnx": "onnxruntime", "openvino": "openvino"}[kind]
    import importlib.util

    cpu = resolve_device(device).type == "cpu"
    if cpu and precision in (None, "fp32", "bf16") and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return "torch"


@dataclass(frozen=True)
class Int8Verdict:
    """One measured int8-vs-fp32 comparison on the evaluation set (``medsr-eval``): the data the automatic CPU
    precision rule reads. ``accepted`` only when PSNR and SSIM stay within :data:`INT8_LIMITS` of fp32 and the
    int8 output passes the 16-bit round trip."""

    model: str
    setting: str  # how int8 was made and evaluated
    fp32: tuple[float, float]  # PSNR dB, SSIM (mean over the evaluation images)
    int8: tuple[float, float]
    roundtrip16: bool
    speedup: float  # int8 over fp32 OpenVINO, ms/tile of one medsr-bench run (benchmarks/results/cpu-int8-avx2)
    cpu: str

    @property
    def accepted(self) -> bool:
        dpsnr, dssim = self.fp32[0] - self.int8[0], self.fp32[1] - self.int8[1]
        return dpsnr <= INT8_LIMITS[0] and dssim <= INT8_LIMITS[1] and self.roundtrip16

    def why(self) -> str:
        d = (self.int8[0] - self.fp32[0], self.int8[1] - self.fp32[1])
        verdict = "accepted" if self.accepted else "rejected"
        return (f"int8 {verdict}: {d[0]:+.2f} dB PSNR / {d[1]:+.4f} SSIM vs fp32 on the evaluation set "
                f"(limit {INT8_LIMITS[0]} dB / {INT8_LIMITS[1]})")


#: how far int8 may fall below fp32 on the evaluation set (PSNR dB, SSIM) to be chosen automatically
INT8_LIMITS = (0.05, 0.001)

#: measured verdicts per model (medsr-eval ../shared/data/cxr, 12 chest X-rays, GT resized to 512 px, x4,
#: OpenVINO 2026.4 + NNCF 3.4; int8 calibrated on 100 crops of 64 px from cxr-train, MIXED preset, first /
#: upsampling / HR / last convolutions kept in fp32 (medsr.export.int8.KEEP_FP32); 2-core AMD EPYC Zen3, AVX2,
#: no AVX-512, loaded machine). Speed (medsr-bench, tile 128, same run): int8 2472 ms/tile vs fp32 2638 (1.07x:
#: the fp32-kept convolutions run at 2x and 4x resolution and hold most of the FLOPs). All-convolutions int8
#: (PERFORMANCE preset, 300 crops) was faster (2.58 vs 4.77 s/img in medsr-eval) but far worse: 22.79 dB /
#: 0.8650. A model without an entry never runs int8 automatically.
INT8_VERDICTS: dict[str, Int8Verdict] = {
    "medsr-cxr-x4": Int8Verdict(
        model="medsr-cxr-x4", setting="NNCF MIXED, 100 cxr-train crops, KEEP_FP32; medsr-eval --size 512",
        fp32=(33.99, 0.9048), int8=(33.18, 0.9008), roundtrip16=True, speedup=2637.58 / 2472.04,
        cpu="AMD EPYC (Zen3) 2 cores, AVX2/FMA, no AVX-512, no native bf16; machine loaded",
    ),
    # benchmarks/results/cpu-int8-avx2-fast: 300 calibration crops, same rule; worse on 12/12 images
    "medsr-cxr-x4-fast": Int8Verdict(
        model="medsr-cxr-x4-fast", setting="NNCF MIXED, 300 cxr-train crops, KEEP_FP32; medsr-eval --size 512",
        fp32=(33.70, 0.9001), int8=(32.94, 0.8832), roundtrip16=True, speedup=491.01 / 158.08,
        cpu="AMD EPYC (Zen3) 2 cores, AVX2/FMA, no AVX-512, no native bf16; quiet machine",
    ),
}


def int8_verdict(model_id: str) -> Int8Verdict | None:
    return INT8_VERDICTS.get(model_id)


def auto_precision(runtime: str, precision: str | None, model_id: str | None = None) -> str | None:
    """The precision of the automatic CPU path when none is asked: OpenVINO bf16 on a CPU that computes bf16
    natively (AVX512-BF16 / AMX); elsewhere int8 only where :data:`INT8_VERDICTS` accepts it for the model
    (fidelity measured on the evaluation set; no model is accepted today, see the table), else fp32.
    bf16 is the fastest CPU path within 0.5/255 mean error of fp32 with an exact 16-bit round trip
    (benchmarks/results/cpu-cxr-x4: 2.0x fp32, mean error 0.25/255, 58 dB); ``precision="fp32"`` keeps IEEE
    fp32. Other runtimes: ``precision`` unchanged."""
    if precision is not None or runtime != "openvino":
        return precision
    from medsr.runtime.openvino_backend import native_bf16

    if native_bf16():
        return "bf16"
    v = int8_verdict(model_id or "")
    return "int8" if v is not None and v.accepted else "fp32"


def machine_precisions(runtime: str = "auto", device: str | Any = "auto") -> tuple[str, ...]:
    """The precisions ``runtime`` can run on ``device`` on *this* machine, in the order a user would try them:
    what a ``--precision`` refusal suggests (never a precision this machine would refuse in turn).

    ``auto`` on a CPU is OpenVINO when installed (weights), else PyTorch: OpenVINO runs fp32 and bf16 only on
    a CPU with native bf16 (int8 is not listed: it runs from an int8 IR written by ``medsr-export
    --openvino-int8``, never from weights); PyTorch on a CPU runs fp32 and bf16 (autocast); on CUDA fp32, tf32
    (Ampere+), fp16 and bf16 (where the GPU supports it). ONNX Runtime and TensorRT run the precision baked
    into the file (fp32 or fp16)."""
    import importlib.util

    from medsr.runtime.backend import resolve_device

    dev = resolve_device(device)
    if runtime == "auto":
        has_ov = importlib.util.find_spec("openvino") is not None
        runtime = "openvino" if dev.type == "cpu" and has_ov else "torch"
    if runtime == "openvino":
        from medsr.runtime.openvino_backend import native_bf16

        return ("fp32",) + (("bf16",) if native_bf16() else ())
    if runtime == "torch":
        if dev.type == "cpu":
            return ("fp32", "bf16")
        import torch

        ampere = torch.cuda.get_device_capability(dev)[0] >= 8
        return ("fp32",) + (("tf32",) if ampere else ()) + ("fp16",) + (
            ("bf16",) if torch.cuda.is_bf16_supported() else ())
    return ("fp32", "fp16")  # onnxruntime, tensorrt: the file's own (x.onnx / x.fp16.onnx, the engine's)


def check_machine_precision(runtime: str, device: str | Any, precision: str | None) -> None:
    """BackendError naming what this machine can do when ``precision`` is not among
    :func:`machine_precisions` (e.g. bf16 on a CPU without native bf16; fp16 on a CPU)."""
    if precision is None:
        return
    from medsr.runtime.backend import resolve_device

    can = machine_precisions(runtime, device)
    if precision not in can:
        dev = resolve_device(device)
        why = ""
        if precision == "bf16" and dev.type == "cpu":
            why = " (this CPU has no native bf16: AVX512-BF16 or AMX)"
        elif precision in ("fp16", "tf32") and dev.type == "cpu":
            why = f" ({precision} is a CUDA precision)"
        elif precision == "int8":
            why = " (int8 runs from an int8 OpenVINO IR: medsr-export --openvino-int8 CALIB_DIR, then --engine x.int8.xml)"
        raise BackendError(
            f"precision {precision} is not available for runtime {runtime} on {dev}{why}; "
            f"this machine can run: {', '.join(can)}"
        )


def precision_reason(model_id: str | None = None) -> str:
    """Why :func:`auto_precision` picks what it picks for OpenVINO on this CPU (for the run's log line)."""
    from medsr.runtime.openvino_backend import native_bf16

    if native_bf16():
        return "native bf16"
    v = int8_verdict(model_id or "")
    return "no native bf16; " + (v.why() if v is not None else "int8 not evaluated for this model")


def _open_onnx(path: Path, precision: str | None, **kwargs: Any) -> Backend:
    """ONNX Runtime on ``path``, or on its fp32/fp16 sibling (``x.onnx`` <-> ``x.fp16.onnx``) when the asked
    precision is the sibling's; BackendError when neither runs ``precision`` (read from the metadata)."""
    from medsr.runtime.onnx_backend import OnnxRuntimeBackend

    if precision not in (None, "fp32", "fp16"):
        raise BackendError(
            f"{path}: ONNX Runtime runs the precision baked into the ONNX (fp32 or fp16), not {precision!r}; "
            f"OpenVINO on this CPU runs {', '.join(machine_precisions('openvino', 'cpu'))} "
            "(--runtime openvino); PyTorch weights run tf32/bf16 on CUDA"
        )
    backend = OnnxRuntimeBackend(path, **kwargs)
    if precision is None or backend.precision == precision:
        return backend
    have = backend.precision
    backend.close()
    sibling = fp16_path_for(path) if precision == "fp16" else fp32_path_for(path)
    if sibling is not None and sibling.is_file():
        other = OnnxRuntimeBackend(sibling, **kwargs)
        if other.precision == precision:
            return other
        other.close()
    raise BackendError(
        f"{path}: this ONNX model is {have} and no {precision} sibling "
        f"({sibling.name if sibling else 'x.onnx <-> x.fp16.onnx'}) exists; export one with "
        f"medsr-export{' --fp16' if precision == 'fp16' else ''}, or run it as {have}"
    )


def open_backend(
    path: str | os.PathLike[str],
    *,
    device: str | Any = "auto",
    precision: str | None = None,
    scale: int | None = None,
    runtime: str = "auto",
    **kwargs: Any,
) -> Backend:
    """Open an engine, ONNX model or weights file as a Backend. ``scale``: fail clearly if it differs."""
    if precision is not None and precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise BackendError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    p = Path(path)
    kind = engine_kind(p)
    if kind == "tensorrt":
        if runtime not in ("auto", "tensorrt"):
            raise BackendError(f"{p}: a TensorRT engine runs on TensorRT only, not {runtime}")
        from medsr.runtime.trt_backend import TensorRTBackend

        return TensorRTBackend(p, device=device, expect_scale=scale, precision=precision, **kwargs)
    if kind == "openvino" or runtime == "openvino":
        from medsr.runtime.openvino_backend import OpenVINOBackend

        if kind == "weights":
            from medsr.runtime.contract import onnx_metadata
            from medsr.weights import load_model

            lm = load_model(str(path))
            meta = onnx_metadata(lm.descriptor, model_id=lm.model_id, precision="fp32", weights_sha256=lm.sha256)
            return OpenVINOBackend.from_module(
                lm.model, meta, device=device, precision=precision, expect_scale=scale, **kwargs
            )
        return OpenVINOBackend(p, device=device, precision=precision, expect_scale=scale, **kwargs)
    if kind == "onnx":
        if runtime not in ("auto", "onnxruntime"):
            raise BackendError(f"{p}: an ONNX model runs on ONNX Runtime or OpenVINO, not {runtime}")
        return _open_onnx(p, precision, device=device, expect_scale=scale, **kwargs)
    if runtime not in ("auto", "torch"):
        raise BackendError(f"{p}: weights run on PyTorch or OpenVINO; export an engine for {runtime}")
    from medsr.runtime.backend import resolve_device
    from medsr.runtime.torch_backend import TorchBackend
    from medsr.weights import load_model

    loaded = load_model(str(path))
    if scale is not None and loaded.descriptor.scale != scale:
        raise BackendError(f"{path}: model is x{loaded.descriptor.scale}, x{scale} was requested")
    backend = TorchBackend(loaded.model, device=resolve_device(device), precision=precision or "fp32", **kwargs)
    backend.model_id = loaded.model_id  # type: ignore[attr-defined]
    backend.weights_sha256 = loaded.sha256  # type: ignore[attr-defined]
    return backend
