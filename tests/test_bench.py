"""medsr-bench behaviour (tiny model, CPU, seconds). No timing is asserted: benchmarks report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medsr.bench.measure import MemoryWatch, error_stats, gemm_peak_tflops, model_flops, time_call
from medsr.bench.paths import PATH_NAMES, get_path, unavailable
from medsr.bench.report import JSON_NAME, MD_NAME, PATHS_PNG, SCALING_PNG
from medsr.bench.scaling import linear_fit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    from medsr.cli.bench import main

    out = tmp_path_factory.mktemp("bench") / "run"
    res = CliRunner().invoke(main, ["--smoke", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, json.loads((out / JSON_NAME).read_text()), res.output


def test_smoke_writes_json_markdown_png(smoke: tuple[Path, dict, str]) -> None:
    out, result, stdout = smoke
    for name in (JSON_NAME, MD_NAME, PATHS_PNG, SCALING_PNG):
        assert (out / name).is_file(), name
    for name in (PATHS_PNG, SCALING_PNG):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert {"meta", "config", "model", "flops", "paths", "peaks", "scaling", "overhead", "default_plan"} <= set(result)
    assert {"host", "date", "device", "torch"} <= set(result["meta"])
    assert result["meta"]["device"] == "cpu"
    assert result["model"]["id"] == "tiny"
    assert "| path |" in stdout and "torch-fp32" in stdout
    md = (out / MD_NAME).read_text()
    assert "## Inference paths" in md and "## Scaling" in md and "## Runtime overhead" in md and "R^2" in md


def test_every_path_is_listed_and_ok_rows_have_metrics(smoke: tuple[Path, dict, str]) -> None:
    _, result, _ = smoke
    rows = {r["path"]: r for r in result["paths"]}
    assert list(rows) == list(PATH_NAMES)  # skipped paths appear, they do not disappear
    keys = {"ms_per_tile", "lr_mpix_s", "tflops", "pct_peak", "peak_rss_mb", "peak_gpu_mb", "max_abs_err", "psnr_db", "timing"}
    for name in ("torch-fp32", "torch-fp32-cl", "torch-bf16-cl", "ort-cpu"):
        assert rows[name]["status"] == "ok", rows[name]
        assert keys <= set(rows[name])
        assert rows[name]["ms_per_tile"] > 0 and rows[name]["tflops"] > 0
        assert rows[name]["peak_rss_mb"] > 0
    assert "cpu-fp32" in result["peaks"] and result["peaks"]["cpu-fp32"]["tflops"] > 0


def test_torch_fp32_error_is_zero_and_other_paths_close(smoke: tuple[Path, dict, str]) -> None:
    _, result, _ = smoke
    rows = {r["path"]: r for r in result["paths"]}
    assert rows["torch-fp32"]["max_abs_err"] == 0.0
    assert rows["torch-fp32"]["psnr_db"] == "inf"
    assert rows["torch-fp32-cl"]["max_abs_err"] < 1e-4
    assert rows["ort-cpu"]["max_abs_err"] < 1e-4
    assert rows["torch-bf16-cl"]["max_abs_err"] < 0.1


def test_skipped_paths_carry_a_reason(smoke: tuple[Path, dict, str]) -> None:
    out, result, _ = smoke
    skipped = [r for r in result["paths"] if r["status"] == "skipped"]
    assert skipped, "a CPU smoke run skips at least the GPU paths"
    for r in skipped:
        assert isinstance(r["reason"], str) and r["reason"].strip()
    md = (out / MD_NAME).read_text()
    assert "skipped: " in md


def test_scaling_and_overhead_sections(smoke: tuple[Path, dict, str]) -> None:
    _, result, _ = smoke
    sc = result["scaling"]
    assert len(sc["points"]) >= 5
    assert {"slope", "intercept", "r2"} <= set(sc["time_fit"]) and {"slope", "r2"} <= set(sc["memory_fit"])
    assert all(p["seconds"] > 0 and p["num_tiles"] >= 1 for p in sc["points"])
    ov = result["overhead"]
    assert ov["overhead_ratio"] > 0 and ov["model_s"] > 0 and ov["extra_pixel_ratio"] >= 0
    assert [p["lr_hw"] for p in result["default_plan"]] == [[1024, 1024], [3000, 2500]]


def test_skip_reasons_for_unavailable_paths() -> None:
    assert unavailable(get_path("torch-fp32"), "cpu") is None
    if not torch.cuda.is_available():
        for name in ("torch-fp16-cl", "ort-cuda", "ort-cuda-fp16", "trt-fp16"):
            assert unavailable(get_path(name), "cpu")
    with pytest.raises(KeyError):
        get_path("no-such-path")


def test_a_failing_path_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    import medsr.bench.runner as runner
    from medsr.bench.paths import build_backend

    def flaky(spec, *a, **k):  # noqa: ANN001, ANN002, ANN003
        if spec.name == "torch-fp32-cl":
            raise RuntimeError("inductor exploded")
        return build_backend(spec, *a, **k)

    monkeypatch.setattr(runner, "build_backend", flaky)
    cfg = runner.BenchConfig(tile=16, batch=1, repeats=1, paths=["torch-fp32", "torch-fp32-cl"], gemm_n=64)
    result = runner.run_bench(cfg, log=lambda s: None)
    rows = {r["path"]: r for r in result["paths"]}
    assert rows["torch-fp32"]["status"] == "ok"
    assert rows["torch-fp32-cl"]["status"] == "skipped"
    assert "inductor exploded" in rows["torch-fp32-cl"]["reason"]
    assert rows["torch-compile"]["reason"].startswith("not selected")


def _conv_macs_per_lr_pixel(model: torch.nn.Module, h: int, w: int) -> float:
    total = 0

    def hook(mod: torch.nn.Conv2d, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, model.num_in_ch, h, w))
    for hd in hs:
        hd.remove()
    return total / (h * w)


def test_flop_count_matches_hand_computed_tiny_config() -> None:
    from medsr.arch import RRDBNet, rrdbnet_macs_per_lr_pixel

    d = RRDBNet(3, 3, 4, num_feat=8, num_block=1, num_grow_ch=4).descriptor
    # f=8, g=4: RDB = 8*4 + 12*4 + 16*4 + 20*4 + 24*8 = 416; trunk = 3*8 + 3*416 + 8*8 = 1336 (conv_first, 3 RDBs, conv_body)
    # tail per LR px: conv_up1 64*4 + (conv_up2 64 + conv_hr 64 + conv_last 8*3)*16 = 2688; x 9 (3x3 kernels)
    assert rrdbnet_macs_per_lr_pixel(d) == 9 * (1336 + 2688) == 36216
    assert model_flops(d, 100) == 2 * 36216 * 100


@pytest.mark.parametrize("scale", [4, 2])
def test_flop_count_matches_conv_hooks(scale: int) -> None:
    from medsr.arch import RRDBNet, rrdbnet_macs_per_lr_pixel

    m = RRDBNet(3, 3, scale, num_feat=8, num_block=2, num_grow_ch=4).eval()
    assert rrdbnet_macs_per_lr_pixel(m.descriptor) == pytest.approx(_conv_macs_per_lr_pixel(m, 16, 16))


def test_linear_fit() -> None:
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    fit = linear_fit(x, 3.0 * x + 0.5)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["slope"] == pytest.approx(3.0) and fit["intercept"] == pytest.approx(0.5)
    noisy = linear_fit(x, [1.0, 5.0, 2.0, 7.0, 1.0])
    assert noisy["r2"] < 0.5
    flat = linear_fit(x, [2.0] * 5)
    assert flat["slope"] == pytest.approx(0.0, abs=1e-12) and flat["r2"] == 1.0
    with pytest.raises(ValueError):
        linear_fit([1.0], [1.0])


def test_error_stats() -> None:
    a = np.full((2, 3), 0.5, dtype=np.float32)
    same = error_stats(a, a.copy())
    assert same["max_abs_err"] == 0.0 and math.isinf(same["psnr_db"])
    e = error_stats(a + 0.1, a)
    assert e["max_abs_err"] == pytest.approx(0.1, rel=1e-5)
    assert e["psnr_db"] == pytest.approx(20.0, abs=1e-3)
    assert error_stats(a + 5.0, np.ones_like(a))["max_abs_err"] == 0.0  # compared within [0, 1]


def test_timing_memory_and_gemm_helpers() -> None:
    calls = []
    t = time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.seconds) == 3 and t.best <= t.median
    with MemoryWatch() as mem:
        buf = np.ones(8 * 1024 * 1024 // 8)  # 8 MB
        del buf
    assert mem.peak_rss >= mem.baseline_rss > 0 and mem.peak_gpu is None
    peak = gemm_peak_tflops("cpu", "fp32", n=64, repeats=1)
    assert peak["tflops"] > 0 and peak["n"] == 64


def test_cli_rejects_unknown_paths(tmp_path: Path) -> None:
    from medsr.cli.bench import main

    res = CliRunner().invoke(main, ["--smoke", "--paths", "torch-fp32,warp-drive", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "warp-drive" in res.output


def test_memory_table_runs_each_cpu_path_in_its_own_process(tmp_path) -> None:
    import torch
    from conftest import tiny_rrdb

    from medsr.bench.memory import memory_markdown, run_memory

    w = tmp_path / "tiny.pth"
    torch.save({"params_ema": tiny_rrdb(4, 1).state_dict()}, w)
    rows = run_memory(str(w), size=(40, 30), paths=["torch-fp32", "ort-cpu-fp32", "openvino-fp32"], log=lambda s: None)
    assert [r.path for r in rows] == ["torch-fp32", "ort-cpu-fp32", "openvino-fp32"]
    for r in rows:
        assert r.status == "ok", r.status
        assert 0.05 < r.peak_rss_gb < 3.0  # a real process's RSS (python + torch), not a placeholder
    assert "| torch-fp32 |" in memory_markdown(rows, "tiny", (40, 30))


def test_fastest_accurate_path_needs_the_error_bar_and_the_16_bit_round_trip() -> None:
    from medsr.bench.measure import error_stats
    from medsr.bench.report import fastest_accurate

    ref = np.random.default_rng(0).random((3, 8, 8))
    exact, coarse = error_stats(ref + 1e-4, ref), error_stats(ref + 0.01, ref)
    assert exact["roundtrip16"] and exact["mean_abs_err"] == pytest.approx(1e-4, rel=0.05)
    assert coarse["mean_abs_err"] > 0.5 / 255
    rows = [
        {"path": "slow-exact", "status": "ok", "device": "cpu", "ms_per_tile": 10.0, **exact},
        {"path": "fast-coarse", "status": "ok", "device": "cpu", "ms_per_tile": 1.0, **coarse},
        {"path": "mid-exact", "status": "ok", "device": "cpu", "ms_per_tile": 5.0, **exact},
        {"path": "gpu", "status": "ok", "device": "cuda", "ms_per_tile": 0.1, **exact},
    ]
    assert fastest_accurate({"paths": rows}, "cpu") == "mid-exact"
    rows[2]["roundtrip16"] = False
    assert fastest_accurate({"paths": rows}, "cpu") == "slow-exact"
