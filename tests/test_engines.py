"""The engine contract (one home, one import direction) and no silent downgrades of device or precision."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_rrdb

import medsr
from medsr.api import Upscaler
from medsr.runtime import TileConfig, TorchBackend
from medsr.runtime import contract as C
from medsr.runtime.backend import BackendError
from medsr.runtime.engines import open_backend

PKG = Path(medsr.__file__).parent
HAS_OV = importlib.util.find_spec("openvino") is not None


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_imports_flow_one_way() -> None:
    """runtime never imports export (nor train/eval/bench/cli); io never imports runtime."""
    for f in sorted((PKG / "runtime").glob("*.py")):
        bad = {m for m in _imports(f) if m.split(".")[:2] in (["medsr", "export"], ["medsr", "train"], ["medsr", "eval"],
                                                              ["medsr", "bench"], ["medsr", "cli"])}
        assert not bad, f"{f.name} imports {bad}"
    for f in sorted((PKG / "io").glob("*.py")):
        bad = {m for m in _imports(f) if m.startswith(("medsr.runtime", "medsr.export", "medsr.api"))}
        assert not bad, f"{f.name} imports {bad}"


def test_defaults_have_one_home() -> None:
    from medsr.export.recipes import Recipe

    cfg = TileConfig()
    assert (cfg.tile, cfg.overlap, cfg.resolved_halo) == (C.DEFAULT_TILE, C.DEFAULT_OVERLAP, C.default_halo(C.DEFAULT_OVERLAP))
    r = Recipe(name="x", model="m", channels=1, scale=4)
    assert (r.tile, r.overlap, r.batch, r.max_batch) == (C.DEFAULT_TILE, C.DEFAULT_OVERLAP, C.DEFAULT_BATCH, C.DEFAULT_MAX_BATCH)
    backend = TorchBackend(tiny_rrdb(4, 1), device="cpu")
    assert backend.preferred_batch == C.DEFAULT_CPU_BATCH == C.default_batch("cpu") and C.default_batch("cuda") == C.DEFAULT_BATCH
    assert Upscaler(backend).plan(600, 600).batch == C.DEFAULT_CPU_BATCH  # batch None: the backend's


def test_eval_and_train_list_what_io_reads(tmp_path: Path) -> None:
    import cv2

    from medsr.eval.protocol import list_images as eval_list
    from medsr.train.data import list_images as train_list

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "b.bmp"), np.zeros((8, 8), np.uint8))  # io does not read BMP
    assert [p.name for p in eval_list(tmp_path)] == ["a.png"]
    assert [p.name for p in train_list(tmp_path)] == ["a.png"]


def test_atomic_writes_raise_os_errors_not_image_errors(tmp_path: Path) -> None:
    from medsr.fsutil import EmptyWriteError, atomic_write_path
    from medsr.io import ImageWriteError

    with pytest.raises(EmptyWriteError) as ei, atomic_write_path(tmp_path / "model.onnx"):
        pass  # wrote nothing
    assert isinstance(ei.value, OSError) and not isinstance(ei.value, ImageWriteError)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- precision


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from medsr.export import export_onnx, fp16_path_for

    d = tmp_path_factory.mktemp("onnx")
    m = tiny_rrdb(2, 1)
    export_onnx(m, d / "m.onnx", model_id="tiny", weights_sha256="ab" * 32)
    export_onnx(m, fp16_path_for(d / "m.onnx"), precision="fp16", model_id="tiny")
    export_onnx(m, d / "alone.onnx", model_id="tiny")
    return m, d


def test_onnx_precision_is_honoured_or_refused(onnx_pair: tuple[torch.nn.Module, Path]) -> None:
    _, d = onnx_pair
    assert open_backend(d / "m.onnx").precision == "fp32"  # None: the file's own
    b16 = open_backend(d / "m.onnx", device="cpu", precision="fp16")  # honoured by the fp16 sibling
    assert b16.precision == "fp16" and b16.path.name == "m.fp16.onnx"
    assert open_backend(d / "m.fp16.onnx", precision="fp32").path.name == "m.onnx"
    with pytest.raises(BackendError, match=r"alone.onnx: this ONNX model is fp32 and no fp16 sibling .*medsr-export --fp16"):
        open_backend(d / "alone.onnx", precision="fp16")
    with pytest.raises(BackendError, match="precision baked into the ONNX") as refused:
        open_backend(d / "m.onnx", precision="bf16")
    from medsr.runtime.openvino_backend import native_bf16

    # the refusal suggests bf16 on OpenVINO only where this CPU computes bf16 natively
    ov = str(refused.value).split("OpenVINO on this CPU runs", 1)[1].split("(--runtime openvino)", 1)[0]
    assert ("bf16" in ov) == native_bf16()
    up = Upscaler.from_engine(d / "m.onnx")
    assert up.model_id == "tiny" and up.weights_sha256 == "ab" * 32  # from the metadata: identity travels


def test_cli_refuses_a_precision_the_engine_cannot_run(onnx_pair: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    import cv2

    from medsr.cli.infer import main

    _, d = onnx_pair
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    r = CliRunner().invoke(main, ["-q", "--engine", str(d / "alone.onnx"), "--precision", "fp16", str(tmp_path / "a.png"),
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no fp16 sibling" in r.output and not (tmp_path / "o" / "a.png").exists()
    r = CliRunner().invoke(main, ["-q", "--engine", str(d / "m.onnx"), "--precision", "fp16", "--device", "cpu",
                                  str(tmp_path / "a.png"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output  # the fp16 sibling ran (ONNX Runtime CPU runs fp16 graphs)


def test_tf32_is_its_own_precision_and_cuda_only() -> None:
    from medsr.runtime.torch_backend import cuda_fp32_math

    with pytest.raises(BackendError, match="'tf32' is a CUDA"):
        TorchBackend(tiny_rrdb(4, 1), device="cpu", precision="tf32")
    conv = torch.backends.cudnn.conv
    before = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    with cuda_fp32_math(tf32=False):
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    with cuda_fp32_math(tf32=True):
        assert conv.fp32_precision == "tf32"
    assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before  # restored


# ---------------------------------------------------------------------------------- OpenVINO


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_openvino_fp32_matches_torch_and_bf16_is_native_or_refused(onnx_pair: tuple[torch.nn.Module, Path]) -> None:
    m, d = onnx_pair
    b = open_backend(d / "m.onnx", runtime="openvino")
    assert b.name == "openvino" and b.precision == "fp32" and b.model_id == "tiny"
    x = torch.rand(3, 1, 24, 20)
    with torch.no_grad():
        ref = m.float()(x).clamp(0, 1)
    assert (b.run(x) - ref).abs().max() < 1e-5
    with pytest.raises(BackendError, match="fp32 or bf16"):
        open_backend(d / "m.onnx", runtime="openvino", precision="fp16")
    with pytest.raises(BackendError, match="fp32 ONNX"):
        open_backend(d / "m.fp16.onnx", runtime="openvino")
    import openvino as ov

    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        bb = open_backend(d / "m.onnx", runtime="openvino", precision="bf16")
        assert bb.precision == "bf16" and bb.fallback().precision == "fp32"
        assert (bb.run(x) - ref).abs().mean() < 0.02
    else:
        with pytest.raises(BackendError, match="no native bf16"):
            open_backend(d / "m.onnx", runtime="openvino", precision="bf16")


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_openvino_ir_and_weights_keep_identity(onnx_pair: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    from medsr.export.openvino import export_openvino_ir

    m, d = onnx_pair
    xml = export_openvino_ir(d / "m.onnx", tmp_path / "ir" / "m.xml")
    b = open_backend(xml)
    assert (b.model_id, b.weights_sha256, b.descriptor) == ("tiny", "ab" * 32, m.descriptor)
    w = tmp_path / "tiny.pth"
    torch.save({"params_ema": m.state_dict()}, w)
    up = Upscaler.from_engine(w, runtime="openvino")
    ref = Upscaler.from_pretrained(w)
    x = (np.random.default_rng(0).random((20, 18)) * 65535).astype(np.uint16)
    assert up.backend.name == "openvino" and up.weights_sha256 == ref.weights_sha256
    assert np.abs(up(x).astype(int) - ref(x).astype(int)).max() <= 1


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_cpu_default_is_openvino_bf16_where_native_else_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Upscaler.load with no runtime/precision on a CPU: OpenVINO, bf16 exactly when the CPU has native
    bf16; an explicit precision, another runtime or a file engine keeps its own."""
    from medsr.runtime import openvino_backend
    from medsr.runtime.engines import auto_precision

    w = tmp_path / "tiny.pth"
    torch.save({"params_ema": tiny_rrdb(2, 3, seed=1).state_dict()}, w)
    for native in (True, False):
        monkeypatch.setattr(openvino_backend, "native_bf16", lambda native=native: native)
        assert auto_precision("openvino", None) == ("bf16" if native else "fp32")
        assert auto_precision("openvino", "fp32") == "fp32" and auto_precision("onnxruntime", None) is None
        assert auto_precision("torch", None) is None
    monkeypatch.undo()
    up = Upscaler.load(str(w), device="cpu")
    assert up.backend.name == "openvino"
    assert up.backend.precision == ("bf16" if openvino_backend.native_bf16() else "fp32")
    assert Upscaler.load(str(w), device="cpu", precision="fp32").backend.precision == "fp32"
    assert Upscaler.load(str(w), device="cpu", runtime="torch").backend.name == "torch"


def test_openvino_conversion_sends_no_telemetry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert_model reports usage through openvino_telemetry unless declined; each send forks a process that
    posts to Google Analytics (and hung the interpreter's exit without internet). medsr declines it."""
    pytest.importorskip("openvino")
    ga4 = pytest.importorskip("openvino_telemetry.backend.backend_ga4")
    from medsr.runtime.openvino_backend import OpenVINOBackend

    sent: list[object] = []
    monkeypatch.setattr(ga4.GA4Backend, "send", lambda self, *a, **k: sent.append(a))
    monkeypatch.setenv("HOME", str(tmp_path))  # no consent file: the tools' default is to send
    monkeypatch.delenv("CI", raising=False)
    import openvino_telemetry

    monkeypatch.setattr(openvino_telemetry.Telemetry, "_instances", {}, raising=False)  # a fresh singleton
    from medsr.runtime.contract import onnx_metadata

    m = tiny_rrdb(4, 1)
    meta = onnx_metadata(m.descriptor, model_id="tiny", precision="fp32", weights_sha256="")
    OpenVINOBackend.from_module(m, meta, cache=False, precision="fp32")
    assert sent == []
    import os

    assert "CI" not in os.environ  # restored after the call
