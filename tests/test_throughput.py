"""Issue 24: what ran (describe, summary line, precision refusals), the OpenVINO compiled-model cache, int8,
the GPU script's dry run and the overlapped pipeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_rrdb

from medsr.api import Upscaler
from medsr.runtime.backend import BackendError

HAS_OV = importlib.util.find_spec("openvino") is not None


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    p = tmp_path / "tiny_x4.pth"
    torch.save({"params_ema": tiny_rrdb(4, 3).state_dict()}, p)
    return p


# ------------------------------------------------------------------------------------------ what ran


def test_describe_and_repr_name_runtime_precision_device_model_tiles(weights: Path) -> None:
    up = Upscaler.load(str(weights), runtime="torch", device="cpu", tile=32, overlap=8)
    d = up.describe()
    assert d.startswith("torch fp32 on cpu, model tiny_x4 x4 3ch")
    assert "tile 32 overlap 8 halo 2 batch 1" in d
    assert repr(up) == f"<Upscaler {d}>"


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_auto_choice_is_named(weights: Path) -> None:
    from medsr.runtime.openvino_backend import native_bf16

    up = Upscaler.load(str(weights), device="cpu")
    want = "bf16 on cpu (auto: native bf16)" if native_bf16() else "fp32 on cpu (auto: no native bf16)"
    assert up.describe().startswith(f"openvino {want}"), up.describe()
    # an explicit precision is not an automatic choice
    assert "auto" not in Upscaler.load(str(weights), device="cpu", precision="fp32").describe()


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
@pytest.mark.parametrize("native", [True, False])
def test_machine_precisions_follow_the_cpu(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsr.runtime import openvino_backend
    from medsr.runtime.engines import check_machine_precision, machine_precisions

    monkeypatch.setattr(openvino_backend, "native_bf16", lambda: native)
    can = machine_precisions("auto", "cpu")
    assert can[0] == "fp32" and ("bf16" in can) == native and "fp16" not in can and "tf32" not in can
    assert machine_precisions("torch", "cpu") == ("fp32", "bf16")
    for asked in ("fp16", "tf32") + (() if native else ("bf16",)):
        with pytest.raises(BackendError) as e:
            check_machine_precision("auto", "cpu", asked)
        suggested = str(e.value).split("this machine can run: ")[1]
        assert suggested == ", ".join(can)  # only what this machine runs
    check_machine_precision("auto", "cpu", "fp32")


def test_cli_names_what_ran_in_log_and_summary(weights: Path, tmp_path: Path) -> None:
    import cv2

    from medsr.cli.infer import main

    src = tmp_path / "in.png"
    cv2.imwrite(str(src), (np.random.default_rng(0).random((20, 24)) * 65535).astype(np.uint16))
    res = CliRunner().invoke(main, ["--quiet", "--device", "cpu", "--runtime", "torch", "--tile", "16",
                                    "--overlap", "4", "--model", str(weights), str(src), "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    ran = "torch fp32 on cpu, model tiny_x4 x4 3ch, tile 16 overlap 4 halo 1 batch 1"
    assert f"medsr-infer: running {ran}" in res.output
    summary = [ln for ln in res.output.splitlines() if "1 written" in ln]
    assert summary and summary[0].endswith(f"; ran {ran}")


def test_cli_precision_refusal_suggests_only_this_machine(weights: Path, tmp_path: Path) -> None:
    from medsr.cli.infer import main
    from medsr.runtime.engines import machine_precisions

    src = tmp_path / "in.png"
    import cv2

    cv2.imwrite(str(src), np.zeros((8, 8), np.uint8))
    res = CliRunner().invoke(main, ["--quiet", "--device", "cpu", "--precision", "fp16", "--model", str(weights),
                                    str(src), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert f"this machine can run: {', '.join(machine_precisions('auto', 'cpu'))}" in res.output


# ------------------------------------------------------------------------------------------ start-up


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_openvino_cache_serves_the_second_load(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First load converts the weights and compiles the tile shape into <cache>/openvino/<sha16>/; the second
    load reads the converted IR (no conversion) and the compiled blob (nothing new written), same output."""
    import openvino as ov

    from medsr.weights.registry import cache_dir

    x = (np.random.default_rng(0).random((20, 24)) * 65535).astype(np.uint16)
    up = Upscaler.load(str(weights), runtime="openvino", device="cpu", precision="fp32", tile=16, overlap=4)
    root = up.backend.cache_root
    assert root is not None and root.parent == cache_dir() / "openvino"
    assert root.name == up.weights_sha256[:16]
    assert up.backend._compiled is None  # lazy: nothing compiled before the first tile
    first = up(x)
    shape_dir = up.backend.compile_cache_for(up.backend._shape)
    assert shape_dir is not None and shape_dir.relative_to(root).parts[0] == "fp32"
    assert shape_dir.name == "x".join(str(v) for v in up.backend._shape)
    before = _files(root)
    assert "model.xml" in before and "model.bin" in before
    assert any(k.startswith(str(shape_dir.relative_to(root)) + "/") for k in before), before

    def no_convert(*a: object, **k: object) -> None:
        raise AssertionError("converted again although the IR is cached")

    monkeypatch.setattr(ov, "convert_model", no_convert)
    again = Upscaler.load(str(weights), runtime="openvino", device="cpu", precision="fp32", tile=16, overlap=4)
    np.testing.assert_array_equal(again(x), first)
    assert _files(root) == before  # the compiled blob was read, not rebuilt

    # another precision or tile shape gets its own CACHE_DIR, never another's blob
    other = Upscaler.load(str(weights), runtime="openvino", device="cpu", precision="fp32", tile=24, overlap=4)
    got = other(x)
    assert set(_files(root)) > set(before)
    monkeypatch.undo()  # convert_model back; the uncached path is the reference
    monkeypatch.setenv("MEDSR_OPENVINO_CACHE", "0")
    ref = Upscaler.load(str(weights), runtime="openvino", device="cpu", precision="fp32", tile=24, overlap=4)
    assert ref.backend.cache_root is None
    np.testing.assert_array_equal(got, ref(x))


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_openvino_cache_can_be_turned_off(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsr.weights.registry import cache_dir

    monkeypatch.setenv("MEDSR_OPENVINO_CACHE", "0")
    up = Upscaler.load(str(weights), runtime="openvino", device="cpu", precision="fp32", tile=16, overlap=4)
    up(np.zeros((16, 16), np.uint8))
    assert up.backend.cache_root is None and not (cache_dir() / "openvino").exists()


def test_cli_skip_only_pass_does_not_load_the_model(weights: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    from medsr.cli.infer import main

    src = tmp_path / "in.png"
    cv2.imwrite(str(src), np.zeros((8, 8), np.uint8))
    args = ["--quiet", "--device", "cpu", "--runtime", "torch", "--model", str(weights), str(src), "-o",
            str(tmp_path / "o")]
    assert CliRunner().invoke(main, args).exit_code == 0

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("model loaded for a skip-only pass")

    monkeypatch.setattr(Upscaler, "load", boom)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "0 written, 1 skipped" in res.output and "the model was not loaded" in res.output


def test_bench_startup_reports_cold_and_warm(weights: Path, tmp_path: Path) -> None:
    from medsr.bench.startup import measure_startup, startup_markdown

    rows = measure_startup(str(weights), tile=16, home=tmp_path / "h")
    assert [(r["path"], r["phase"]) for r in rows] == [("torch-fp32", "cold"), ("torch-fp32", "warm"),
                                                      ("openvino-auto", "cold"), ("openvino-auto", "warm")]
    for r in rows:
        if r["path"] == "openvino-auto" and not HAS_OV:
            assert r["status"].startswith("skipped")
            continue
        assert r["status"] == "ok" and r["to_first_pixel_s"] > 0 and r["ran"].startswith(r["path"].split("-")[0])
    if HAS_OV:  # the cold run filled the row's own cache folder; torch wrote nothing there
        assert list((tmp_path / "h" / "openvino-auto" / "openvino").glob("*/model.xml"))
        assert not (tmp_path / "h" / "torch-fp32" / "openvino").exists()
    assert "| openvino-auto | warm |" in "\n".join(startup_markdown(rows))
