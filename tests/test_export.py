"""ONNX export (fp32/fp16), parity, metadata, recipes, TensorRT profile/sidecar (plain data), medsr-export CLI."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, tiny_rrdb

from medsr.export import (
    check_onnx,
    export_onnx,
    fp16_path_for,
    fp32_path_for,
    get_recipe,
    list_recipes,
    read_onnx_metadata,
)
from medsr.export.fp16 import find_overflowing_modules, half_model, initializer_dtypes
from medsr.export.parity import check_parity, run_onnx
from medsr.export.recipes import BUILTIN, Recipe
from medsr.runtime.backend import BackendError
from medsr.runtime.contract import (
    check_sidecar,
    make_sidecar,
    profile_for_tiles,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)


def _resize_attrs(path: Path) -> list[dict]:
    m = onnx.load(str(path))
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in m.graph.node if n.op_type == "Resize"]


@pytest.mark.parametrize("scale,channels", [(4, 1), (4, 3), (2, 1), (2, 3)])
def test_export_fp32_parity_metadata(tmp_path: Path, scale: int, channels: int) -> None:
    model = tiny_rrdb(scale, channels)
    res = export_onnx(model, tmp_path / "m.onnx", model_id="tiny", weights_sha256="ab" * 32, opset=17)
    assert res.parity is not None and res.parity.passed and res.parity.max_abs <= 1e-4
    assert any(s[0] > 1 for s in res.parity.shapes)  # batch > 1 covered
    meta = read_onnx_metadata(res.path)
    assert meta["model_id"] == "tiny" and meta["scale"] == str(scale) and meta["in_channels"] == str(channels)
    assert meta["size_multiple"] == str({4: 1, 2: 2}[scale]) and meta["precision"] == "fp32"
    assert meta["weights_sha256"] == "ab" * 32 and meta["io_dtype"] == "float32"
    proto = check_onnx(res.path)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    attrs = _resize_attrs(res.path)
    assert len(attrs) == 2
    for a in attrs:
        assert (a["mode"], a["coordinate_transformation_mode"], a["nearest_mode"]) == (b"nearest", b"asymmetric", b"floor")
    assert not [n for n in proto.graph.node if n.op_type in ("SpaceToDepth", "DepthToSpace")]


def test_dynamic_shapes_odd_and_batched(tmp_path: Path) -> None:
    model = tiny_rrdb(4, 1, seed=3)
    path = export_onnx(model, tmp_path / "m.onnx", parity=False).path
    for n, h, w in [(1, 5, 7), (4, 13, 9), (1, 33, 17), (4, 8, 8)]:
        x = torch.rand(n, 1, h, w)
        out, engine = run_onnx(path, x.numpy())
        assert engine == "onnxruntime" and out.shape == (n, 1, 4 * h, 4 * w)
        assert np.abs(out - model(x).detach().numpy()).max() <= 1e-4


def test_compact_x2_and_real_input(tmp_path: Path, shared_data_optional: list[torch.Tensor]) -> None:
    model = tiny_rrdb(2, 3, seed=5, num_feat=16, num_block=2, num_grow_ch=8)
    path = export_onnx(model, tmp_path / "c.onnx", parity=False).path
    xs = [torch.rand(2, 3, 10, 6)] + shared_data_optional
    rep = check_parity(model, path, inputs=xs)
    assert rep.passed and rep.max_abs <= 1e-4


@pytest.fixture
def shared_data_optional() -> list[torch.Tensor]:
    """A crop of a real radiograph (RGB-replicated, even size) when ../shared/data has one; else nothing."""
    from conftest import SHARED_DATA

    files = sorted((SHARED_DATA / "cxr").glob("*.png"))[:1] if (SHARED_DATA / "cxr").is_dir() else []
    out = []
    for f in files:
        try:
            import cv2

            img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        except Exception:
            continue
        if img is None:
            continue
        img = img.astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0)
        if img.ndim == 3:
            img = img[..., 0]
        crop = img[:30, :22]
        out.append(torch.from_numpy(np.repeat(crop[None, None], 3, 1).copy()))
    return out


@pytest.mark.parametrize("scale,channels", [(4, 1), (2, 3)])
def test_fp16_export(tmp_path: Path, scale: int, channels: int) -> None:
    model = tiny_rrdb(scale, channels, seed=1)
    res = export_onnx(model, tmp_path / "m.fp16.onnx", precision="fp16")
    assert res.parity is not None and res.parity.passed and res.parity.min_psnr_db >= 45.0
    dtypes = initializer_dtypes(str(res.path))
    assert set(dtypes) == {"FLOAT16"}, dtypes
    proto = onnx.load(str(res.path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ops = [n.op_type for n in proto.graph.node]
    assert "Clip" in ops and ops.count("Cast") >= 2
    assert read_onnx_metadata(res.path)["precision"] == "fp16"


def test_fp16_overflow_guard_keeps_module_fp32(tmp_path: Path) -> None:
    model = tiny_rrdb(4, 1, seed=2)
    with torch.no_grad():
        model.conv_last.weight.mul_(1e7)  # conv_last output leaves the fp16 range
    assert "conv_last" in find_overflowing_modules(model, [torch.rand(1, 1, 8, 8)])
    hm = half_model(model, ["conv_last"])
    assert hm.conv_last.inner.weight.dtype == torch.float32 and hm.conv_first.weight.dtype == torch.float16
    res = export_onnx(model, tmp_path / "o.fp16.onnx", precision="fp16", parity=False)
    assert res.kept_fp32 == ["conv_last"]
    x = torch.rand(1, 1, 8, 8)
    out, _ = run_onnx(res.path, x.numpy())
    assert np.isfinite(out).all()


def test_fp16_naming_convention() -> None:
    assert fp16_path_for("engines/cxr_x4.onnx") == Path("engines/cxr_x4.fp16.onnx")
    assert fp32_path_for("engines/cxr_x4.fp16.onnx") == Path("engines/cxr_x4.onnx")
    assert fp32_path_for("engines/cxr_x4.onnx") is None


def test_dynamo_exporter(tmp_path: Path) -> None:
    model = tiny_rrdb(2, 1, seed=4)
    res = export_onnx(model, tmp_path / "d.onnx", exporter="dynamo")
    assert res.parity is not None and res.parity.passed


def test_corrupt_onnx_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 3)
    with pytest.raises(BackendError, match="broken.onnx"):
        read_onnx_metadata(bad)
    with pytest.raises(BackendError, match="not found"):
        check_onnx(tmp_path / "missing.onnx")


def test_recipes_toml_match_builtin() -> None:
    assert set(list_recipes()) >= {"cxr_x4", "retina_x2", "realesrgan_x4plus"}
    for name, data in BUILTIN.items():
        with open(REPO / "export" / f"{name}.toml", "rb") as f:
            from_toml = tomllib.load(f)
        assert Recipe(name=name, **from_toml) == Recipe(name=name, **data), name
        assert get_recipe(name) == Recipe(name=name, **data)
    r = get_recipe("cxr_x4")
    assert (r.model, r.channels, r.scale) == ("medsr-cxr-x4", 1, 4)
    assert (get_recipe("retina_x2").model, get_recipe("retina_x2").channels) == ("medsr-retina-x2", 3)
    with pytest.raises(KeyError, match="known"):
        get_recipe("nope")


def test_recipes_builtin_without_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDSR_RECIPES", str(tmp_path))  # empty folder: no recipes there
    assert list_recipes() == []
    import medsr.export.recipes as rec

    monkeypatch.delenv("MEDSR_RECIPES")
    monkeypatch.setattr(rec, "recipes_dir", lambda: None)
    assert rec.get_recipe("retina_x2").scale == 2


def test_profile_and_sidecar_plain_data(tmp_path: Path) -> None:
    d = tiny_rrdb(2, 3).descriptor
    prof = profile_for_tiles(d, tile=256, overlap=16, batch=4, max_batch=8)
    assert prof.opt == (4, 3, 256, 256) and prof.max == (8, 3, 256, 256) and prof.min == (1, 3, 32, 32)
    lim = prof.tile_limits(multiple=2)
    assert lim.accepts(256, 256) and lim.accepts(64, 128) and not lim.accepts(258, 256) and not lim.accepts(16, 16)
    assert profile_for_tiles(tiny_rrdb(2, 1).descriptor, tile=255).opt[2] == 256  # rounded to the multiple
    engine = tmp_path / "m.plan"
    data = make_sidecar(
        model_id="tiny", descriptor=d, precision="fp16", profile=prof,
        io={"input": {"mode": "input", "dtype": "float32"}, "output": {"mode": "output", "dtype": "float32"}},
        tensorrt_version="11.4.0.106", gpu_name="NVIDIA H100", compute_capability=(9, 0), weights_sha256="cd" * 32,
        onnx_file="m.fp16.onnx",
    )
    write_sidecar(engine, data)
    assert sidecar_path(engine) == tmp_path / "m.json"
    back = read_sidecar(engine)
    assert back == json.loads(json.dumps(data))
    for k in ("model_id", "scale", "channels", "io", "profile", "precision", "tensorrt_version", "gpu_name",
              "compute_capability", "weights_sha256"):
        assert k in back
    assert back["compute_capability"] == "9.0" and back["profile"]["opt"] == [4, 3, 256, 256]
    check_sidecar(back, engine, tensorrt_version="11.4.0.106", compute_capability="9.0", scale=2)
    with pytest.raises(BackendError, match=r"x2 .*x4 was requested.*rebuild|x4 was requested"):
        check_sidecar(back, engine, scale=4)
    with pytest.raises(BackendError, match="TensorRT 11.4.0.106.*10.9.*medsr-export"):
        check_sidecar(back, engine, tensorrt_version="10.9.0")
    with pytest.raises(BackendError, match="GPU-specific.*medsr-export"):
        check_sidecar(back, engine, gpu_name="NVIDIA A10", compute_capability="8.6")
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(BackendError, match="corrupt engine sidecar"):
        read_sidecar(engine)


def _save_tiny(tmp_path: Path, scale: int, channels: int) -> Path:
    p = tmp_path / f"tiny_x{scale}.pth"
    torch.save({"params_ema": tiny_rrdb(scale, channels).state_dict()}, p)
    return p


def test_cli_onnx_and_skipped_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsr.cli.export import main
    from medsr.export.tensorrt import tensorrt_status

    w = _save_tiny(tmp_path, 2, 3)
    runner = CliRunner()
    r = runner.invoke(main, ["--weights", str(w), "--recipe", "retina_x2", "-o", str(tmp_path / "out" / "r.onnx")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "r.onnx").is_file() and (tmp_path / "out" / "r.fp16.onnx").is_file()
    assert "parity" in r.output and "no engine built" in r.output
    if tensorrt_status()[0]:
        return
    # explicit .plan without TensorRT: ONNX written, engine skipped, non-zero exit
    r = runner.invoke(main, ["--weights", str(w), "--recipe", "retina_x2", "--no-fp16", "-o", str(tmp_path / "e" / "r.plan")])
    assert r.exit_code == 1 and "SKIPPED" in r.output and (tmp_path / "e" / "r.onnx").is_file()
    # default output name from the recipe: skipped engine is not an error; gray fold for cxr_x4
    w4 = _save_tiny(tmp_path, 4, 3)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["--weights", str(w4), "--no-fp16"])
    assert r.exit_code == 0, r.output
    assert "SKIPPED" in r.output
    meta = read_onnx_metadata(tmp_path / "engines" / "cxr_x4.onnx")
    assert meta["in_channels"] == "1" and meta["model_id"].endswith("+gray")
    # scale mismatch between weights and recipe
    r = runner.invoke(main, ["--weights", str(w), "--recipe", "cxr_x4", "--onnx-only"])
    assert r.exit_code != 0 and "x2" in r.output and "recipe" in r.output


def test_failed_parity_leaves_no_model_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsr.export import onnx_export
    from medsr.export.parity import ParityError

    def failing(*args: object, **kwargs: object) -> None:
        raise ParityError("simulated: out of bound")

    monkeypatch.setattr(onnx_export, "check_parity", failing)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous good export")
    with pytest.raises(ParityError):
        export_onnx(tiny_rrdb(4, 1), out)
    assert out.read_bytes() == b"previous good export"  # the failed export never replaced it
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # and left no temporary file


def test_cli_writes_an_openvino_ir_that_infer_runs(tmp_path: Path) -> None:
    """`medsr-export -o x.xml` (documented in docs/export.md) writes the IR medsr-infer --engine runs."""
    pytest.importorskip("openvino")
    from medsr import Upscaler
    from medsr.cli.export import main

    w = _save_tiny(tmp_path, 2, 3)
    xml = tmp_path / "out" / "r.xml"
    r = CliRunner().invoke(main, ["--weights", str(w), "--recipe", "retina_x2", "--no-fp16", "-o", str(xml)])
    assert r.exit_code == 0, r.output
    assert xml.is_file() and xml.with_suffix(".bin").is_file() and "no engine built" in r.output
    up = Upscaler.load(xml, device="cpu", tile=16, overlap=4)
    assert up.runtime == "openvino" and up.scale == 2


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_bicubic_skip_exports_with_parity(tmp_path: Path, exporter: str) -> None:
    from medsr.arch import RRDBNet

    torch.manual_seed(1)
    model = RRDBNet(3, 3, 2, 8, 1, 4, skip="bicubic").eval()
    res = export_onnx(model, tmp_path / "s.onnx", exporter=exporter)
    assert res.parity is not None and res.parity.passed and res.parity.max_abs < 1e-4
    modes = sorted(a.get("mode") for a in _resize_attrs(tmp_path / "s.onnx"))
    assert b"cubic" in modes
    assert json.loads(read_onnx_metadata(tmp_path / "s.onnx")["descriptor"])["skip"] == "bicubic"


def test_check_onnx_refuses_a_cubic_resize_that_is_not_pytorchs(tmp_path: Path) -> None:
    from medsr.arch import RRDBNet

    model = RRDBNet(1, 1, 2, 8, 1, 4, skip="bicubic").eval()
    export_onnx(model, tmp_path / "s.onnx", parity=False)
    m = onnx.load(str(tmp_path / "s.onnx"))
    for n in m.graph.node:
        if n.op_type == "Resize":
            for a in n.attribute:
                if a.name == "cubic_coeff_a":
                    a.f = -0.5  # OpenCV/Keys' a = -0.5 gives other pixels than PyTorch
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(BackendError, match="bicubic"):
        check_onnx(tmp_path / "bad.onnx")
