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
    want = "bf16 on cpu (auto: native bf16)" if native_bf16() else "fp32 on cpu (auto: no native bf16; int8 not"
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
    for asked in ("fp16", "tf32", "int8") + (() if native else ("bf16",)):
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
    assert f"medsr-infer running {ran}" in res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("medsr-infer: ")][0].startswith("medsr-infer: 1 written")
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
    assert "0 written, 1 skipped" in res.output and "medsr-infer running" not in res.output  # no model loaded


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


# ------------------------------------------------------------------------------------------ int8


def test_int8_rule_is_the_measured_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """No native bf16: int8 only for a model whose measured verdict holds the limits; the reason says why."""
    from medsr.runtime import engines, openvino_backend

    monkeypatch.setattr(openvino_backend, "native_bf16", lambda: False)
    v = engines.int8_verdict("medsr-cxr-x4")
    assert v is not None and not v.accepted  # measured: -0.81 dB, -0.0040 SSIM
    assert engines.auto_precision("openvino", None, "medsr-cxr-x4") == "fp32"
    assert "int8 rejected: -0.81 dB PSNR" in engines.precision_reason("medsr-cxr-x4")
    assert engines.auto_precision("openvino", None, "medsr-cxr-x4-fast") == "fp32"  # measured: -0.76 dB, 3.1x
    assert "int8 rejected: -0.76 dB PSNR" in engines.precision_reason("medsr-cxr-x4-fast")
    good = engines.Int8Verdict("m", "s", (34.0, 0.90), (33.96, 0.8995), True, 1.8, "cpu")
    monkeypatch.setitem(engines.INT8_VERDICTS, "m", good)
    assert good.accepted and engines.auto_precision("openvino", None, "m") == "int8"
    for bad in (good.__class__("m", "s", (34.0, 0.90), (33.9, 0.8995), True, 1.8, "cpu"),   # PSNR
                good.__class__("m", "s", (34.0, 0.90), (34.0, 0.8985), True, 1.8, "cpu"),   # SSIM
                good.__class__("m", "s", (34.0, 0.90), (34.0, 0.90), False, 1.8, "cpu")):   # round trip
        monkeypatch.setitem(engines.INT8_VERDICTS, "m", bad)
        assert engines.auto_precision("openvino", None, "m") == "fp32"
    monkeypatch.setattr(openvino_backend, "native_bf16", lambda: True)
    assert engines.auto_precision("openvino", None, "m") == "bf16"


@pytest.mark.skipif(not HAS_OV or importlib.util.find_spec("nncf") is None, reason="openvino/nncf not installed")
def test_int8_export_and_run(tmp_path: Path) -> None:
    """medsr-export --openvino-int8 on synthetic calibration images writes an int8 IR that the runtime runs as
    int8 (close to fp32 on the tiny model), refuses as another precision, and PyTorch refuses int8."""
    from medsr.cli.export import main as export_main
    from medsr.export.int8 import synthetic_crops_dir
    from medsr.runtime.engines import open_backend

    w = tmp_path / "tiny.pth"
    torch.save({"params_ema": tiny_rrdb(4, 1, seed=3).state_dict()}, w)
    calib = synthetic_crops_dir(tmp_path / "calib", count=2, size=96)
    out = tmp_path / "e" / "tiny.onnx"
    res = CliRunner().invoke(export_main, ["--weights", str(w), "--recipe", "cxr_x4", "-o", str(out),
                                           "--openvino-int8", str(calib), "--no-fp16"])
    assert res.exit_code == 0, res.output
    xml, q = out.with_suffix(".xml"), out.with_name("tiny.int8.xml")
    assert xml.is_file() and q.is_file() and q.with_suffix(".bin").is_file()
    up8 = Upscaler.from_engine(q)
    assert up8.backend.precision == "int8" and up8.backend.metadata["calibration"].startswith("calib: ")
    assert up8.describe().startswith("openvino int8 on cpu")
    x = (np.random.default_rng(1).random((40, 40)) * 65535).astype(np.uint16)
    ref = Upscaler.from_engine(xml)(x).astype(float)
    got = up8(x).astype(float)
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 0.02 * 65535
    with pytest.raises(BackendError, match="quantized to int8"):
        open_backend(q, precision="fp32")
    with pytest.raises(BackendError, match="int8-quantized OpenVINO IR"):
        open_backend(xml, precision="int8")
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, fp16, bf16, got 'int8'"):
        Upscaler.from_pretrained(w, precision="int8")


# ------------------------------------------------------------------------------------------ pipeline


def _inputs(folder: Path, n: int) -> list[Path]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):  # varied sizes and depths so that finishing order differs from input order
        p = folder / f"img{i}.png"
        h, w = 8 + 6 * (i % 3), 10 + 4 * (i % 2)
        a = (rng.random((h, w)) * (65535 if i % 2 else 255)).astype(np.uint16 if i % 2 else np.uint8)
        cv2.imwrite(str(p), a)
        out.append(p)
    return out


@pytest.mark.parametrize("encoders", [0, 2])
def test_pipeline_matches_sequential_in_order(weights: Path, tmp_path: Path, encoders: int) -> None:
    import cv2
    from conftest import make_cr

    from medsr.pipeline import FAILED, SKIPPED, WRITTEN, PipelineOptions, run_pipeline

    up = Upscaler.load(str(weights), runtime="torch", device="cpu", tile=16, overlap=4)
    srcs = _inputs(tmp_path / "in", 5)
    dcm = tmp_path / "in" / "cr.dcm"
    make_cr(h=12, w=10).save_as(dcm, enforce_file_format=True)
    bad = tmp_path / "in" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 8)
    srcs = [srcs[0], bad, *srcs[1:3], dcm, *srcs[3:]]
    seq, par = tmp_path / "seq", tmp_path / "par"
    for s in srcs:
        if s != bad:
            up.upscale_file(s, seq / s.name)
    (par).mkdir()
    (par / srcs[-1].name).write_bytes(b"exists")  # skipped, untouched
    jobs = [(s, par / s.name) for s in srcs]
    got = list(run_pipeline(up, jobs, options=PipelineOptions(encoders=encoders, depth=1)))
    assert [o.src for o in got] == srcs  # input order
    assert [o.status for o in got] == [WRITTEN, FAILED] + [WRITTEN] * 4 + [SKIPPED]
    assert "bad.png" in got[1].message and (par / srcs[-1].name).read_bytes() == b"exists"
    for s in srcs[:-1]:
        if s == bad:
            assert not (par / s.name).exists()
            continue
        if s.suffix == ".png":
            a = cv2.imread(str(seq / s.name), cv2.IMREAD_UNCHANGED)
            b = cv2.imread(str(par / s.name), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(a, b)
        else:
            import pydicom

            a, b = pydicom.dcmread(seq / s.name), pydicom.dcmread(par / s.name)
            np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
            assert a.SOPInstanceUID == b.SOPInstanceUID  # deterministic derivation, same in the encoder process
    assert got[0].lr_pixels == 8 * 10
    assert not [p for p in par.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_pipeline_queues_are_bounded(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never more than readers + depth images read ahead of the engine."""
    import threading

    from medsr import pipeline

    up = Upscaler.load(str(weights), runtime="torch", device="cpu", tile=16, overlap=4)
    srcs = _inputs(tmp_path / "in", 8)
    started: list[int] = []
    engine_done = [0]
    lock = threading.Lock()
    real_read, real_up = pipeline._read, up.upscale_stored

    def read(*a: object) -> object:
        with lock:
            started.append(len(started) - engine_done[0])  # reads begun beyond what the engine consumed
        return real_read(*a)  # type: ignore[arg-type]

    def upscale(img: object, **k: object) -> object:
        engine_done[0] += 1
        return real_up(img, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "_read", read)
    monkeypatch.setattr(up, "upscale_stored", upscale)
    opts = pipeline.PipelineOptions(readers=1, encoders=0, depth=1)
    out = list(pipeline.run_pipeline(up, [(s, tmp_path / "o" / s.name) for s in srcs], options=opts))
    assert [o.status for o in out] == ["written"] * 8
    assert max(started) <= opts.readers + opts.depth


def test_cli_encoders_same_summary(weights: Path, tmp_path: Path) -> None:
    from medsr.cli.infer import main

    srcs = _inputs(tmp_path / "in", 3)
    base = ["--quiet", "--device", "cpu", "--runtime", "torch", "--tile", "16", "--overlap", "4", "--model",
            str(weights), str(tmp_path / "in")]
    a = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "a")])
    b = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "b"), "--encoders", "2"])
    assert a.exit_code == b.exit_code == 0, b.output
    for r in (a, b):
        assert "3 written, 0 skipped (same job already written), 0 failed" in r.output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(s.name for s in srcs)


# ------------------------------------------------------------------------------------------ GPU script


def test_gpu_script_dry_run_writes_the_expected_files(tmp_path: Path) -> None:
    """benchmarks/gpu/run.sh --dry-run: every step on the CPU with the tiny model; what comes back is at most
    8 files, one folder deep, and every step succeeded."""
    import os
    import subprocess
    import sys
    import tarfile

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "MEDSR_HOME": str(tmp_path / "home")}
    r = subprocess.run(["bash", str(root / "benchmarks" / "gpu" / "run.sh"), "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "gpu-results.tar.gz", "steps.tsv", "summary.md"], files
    steps = [ln.split("\t") for ln in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [s[0] for s in steps] == ["pytest-gpu", "bench-paths", "bench-batch1", "bench-batch2", "pipeline"]
    assert all(s[1].startswith("ok") for s in steps), steps
    with tarfile.open(out / "gpu-results.tar.gz") as t:
        names = t.getnames()
    for want in ("run/bench-paths/results.json", "run/bench-batch2/results.json", "run/pipeline.json",
                 "run/pytest-gpu.log"):
        assert want in names, names
    summary = (out / "summary.md").read_text()
    assert "| torch-fp32-cl | 2 |" in summary and "pipeline / slower stage" in summary
    assert "torch" in (out / "env.txt").read_text()
