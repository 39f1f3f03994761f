"""One benchmark run: every selected path on the same inputs, the GEMM peaks, scaling and overhead."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medsr.bench.measure import MemoryWatch, error_stats, gemm_peak_tflops, model_flops, time_call
from medsr.bench.paths import PATH_NAMES, SMOKE_PATHS, PathSkipped, build_backend, get_path, unavailable

MB = 1024.0 * 1024.0
TINY = "tiny"  # RRDBNet(3, 3, 4, num_feat=8, num_block=1, num_grow_ch=4), seeded


@dataclass
class BenchConfig:
    """What to run. ``preset`` fills the defaults: smoke (tiny model, seconds), quick (x4plus, minutes), full."""

    model: str = TINY
    device: str = "auto"
    tile: int = 64
    batch: int = 1
    repeats: int = 5
    warmup: int = 1
    paths: list[str] | None = None
    scaling_sizes: list[tuple[int, int]] = field(default_factory=list)
    scaling_tile: int = 64
    scaling_overlap: int = 8
    overhead_hw: tuple[int, int] | None = None
    overhead_default_tile: bool = True
    gemm_n: int | None = None
    #: cold and warm start (fresh processes, medsr.bench.startup); the tile of the first image
    startup: bool = False
    preset: str = "custom"

    @classmethod
    def preset_config(cls, preset: str, device: str = "cpu") -> BenchConfig:
        """On GPU the ``ort-cpu`` path is left out (minutes per real-size call); ``--paths`` brings it back."""
        gpu = device == "cuda"
        gpu_paths = [p for p in PATH_NAMES if p != "ort-cpu"]
        if preset == "smoke":
            return cls(model=TINY, tile=32, batch=2, repeats=2, warmup=1, paths=list(SMOKE_PATHS),
                       scaling_sizes=[(32, 32), (32, 64), (64, 64), (64, 96), (96, 96)], scaling_tile=32,
                       scaling_overlap=4, overhead_hw=(64, 64), overhead_default_tile=False, gemm_n=512,
                       startup=True, preset="smoke")
        if preset == "quick":
            if gpu:
                return cls(model="realesrgan-x4plus", tile=256, batch=4, repeats=5, warmup=2, paths=gpu_paths,
                           scaling_sizes=[(256, 256), (512, 512), (768, 768), (1024, 1024), (1536, 1536)],
                           scaling_tile=256, scaling_overlap=16, overhead_hw=(1024, 1024), preset="quick")
            return cls(model="realesrgan-x4plus", tile=48, batch=1, repeats=2, warmup=1,
                       scaling_sizes=[(40, 40), (40, 80), (80, 80), (80, 120), (120, 120)], scaling_tile=48,
                       scaling_overlap=8, overhead_hw=(80, 80), overhead_default_tile=False, startup=True,
                       preset="quick")
        if preset == "full":
            if gpu:
                return cls(model="realesrgan-x4plus", tile=256, batch=4, repeats=10, warmup=3, paths=gpu_paths,
                           scaling_sizes=[(512, 512), (1024, 1024), (1536, 1536), (2048, 2048), (3000, 2500)],
                           scaling_tile=256, scaling_overlap=16, overhead_hw=(1024, 1024), preset="full")
            return cls(model="realesrgan-x4plus", tile=128, batch=1, repeats=3, warmup=1,
                       scaling_sizes=[(128, 128), (128, 256), (256, 256), (256, 384), (384, 384)],
                       scaling_tile=128, scaling_overlap=16, overhead_hw=(256, 256), preset="full")
        raise ValueError(f"unknown preset {preset!r} (smoke, quick, full)")


# ----------------------------------------------------------------------------------------------- model


def tiny_model(seed: int = 0) -> Any:
    import torch

    from medsr.arch import RRDBNet

    g = torch.Generator().manual_seed(seed)
    m = RRDBNet(3, 3, 4, num_feat=8, num_block=1, num_grow_ch=4)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def load_bench_model(spec: str) -> tuple[Any, str, str]:
    """(model, model_id, sha256) for ``tiny``, a registered name, or a weights file."""
    if spec == TINY:
        return tiny_model(), TINY, ""
    from medsr.weights import load_model

    lm = load_model(spec)
    return lm.model.eval(), lm.model_id, lm.sha256


# ------------------------------------------------------------------------------------------------- run


def _host_meta(device: str) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "host": socket.gethostname(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
    }
    try:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        meta["onnxruntime"] = None
    return meta


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return msg or type(e).__name__


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the configured benchmark and return the result dict (see report.py for the layout)."""
    import torch

    from medsr.bench.paths import resolve_device

    device = resolve_device(cfg.device)
    model, model_id, sha = load_bench_model(cfg.model)
    desc = model.descriptor
    c, t, b = desc.in_channels, cfg.tile, cfg.batch
    if t % desc.size_multiple:
        raise ValueError(f"--tile {t} is not a multiple of the model's size multiple {desc.size_multiple}")
    selected = list(cfg.paths) if cfg.paths else list(PATH_NAMES)
    for name in selected:
        get_path(name)  # unknown names fail early

    result: dict[str, Any] = {
        "meta": _host_meta(device),
        "config": {**asdict(cfg), "scaling_sizes": [list(s) for s in cfg.scaling_sizes]},
        "model": {"id": model_id, "sha256": sha, "descriptor": desc.to_dict(), "params": sum(p.numel() for p in model.parameters())},
    }
    from medsr.arch import rrdbnet_macs_per_lr_pixel

    macs = rrdbnet_macs_per_lr_pixel(desc)
    flops_batch = model_flops(desc, b * t * t)
    result["flops"] = {"macs_per_lr_pixel": macs, "flops_per_lr_pixel": 2 * macs, "flops_per_batch": flops_batch}
    log(f"medsr-bench: model {model_id} on {device}, tile {t}x{t}, batch {b}, {cfg.repeats} repeats")

    # the same input batch for every path; the reference is plain PyTorch fp32 on the bench device
    from medsr.bench.scaling import make_input

    img = make_input(t, t * b, c, seed=1)  # b tiles side by side
    x = torch.from_numpy(img).permute(2, 0, 1).reshape(c, t, b, t).permute(2, 0, 1, 3).contiguous()
    ref_model = model.to(device).float().eval()
    with torch.inference_mode():
        reference = ref_model(x.to(device)).float().cpu().numpy()
    model = model.cpu()

    # GEMM peaks, once per (device, precision)
    peaks: dict[str, dict[str, Any]] = {}

    def peak_for(dev: str, precision: str) -> dict[str, Any] | None:
        key = f"{dev}-{precision}"
        if key not in peaks:
            try:
                peaks[key] = gemm_peak_tflops(dev, precision, n=cfg.gemm_n if dev == "cpu" else None)
            except Exception as e:  # e.g. a dtype with no matmul kernel on this CPU
                peaks[key] = {"device": dev, "precision": precision, "error": _reason(e), "tflops": None}
        return peaks[key]

    rows: list[dict[str, Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="medsr-bench-")
    workdir = Path(tmp.name)
    for name in PATH_NAMES:
        spec = get_path(name)
        row: dict[str, Any] = {"path": name, "description": spec.description, "precision": spec.precision}
        if name not in selected:
            rows.append({**row, "status": "skipped", "reason": "not selected (--paths)"})
            continue
        reason = unavailable(spec, device)
        if reason:
            rows.append({**row, "status": "skipped", "reason": reason})
            log(f"  {name:15s} skipped: {reason}")
            continue
        dev = spec.resolved_device(device)
        row["device"] = dev
        backend = None
        try:
            with MemoryWatch(device=dev) as mem:
                backend = build_backend(spec, model, device, workdir, tile=t, batch=b)
                xin = x.to(dev)
                out_holder: list[Any] = []

                def call(backend: Any = backend, xin: Any = xin, out_holder: list[Any] = out_holder) -> None:
                    out_holder[:] = [backend.run(xin)]

                timing = time_call(call, repeats=cfg.repeats, warmup=max(1, cfg.warmup), device=dev)
            out = out_holder[0].float().cpu().numpy()
        except PathSkipped as e:
            rows.append({**row, "status": "skipped", "reason": _reason(e)})
            log(f"  {name:15s} skipped: {_reason(e)}")
            continue
        except Exception as e:  # a path that fails at run time (e.g. torch.compile) is reported, not fatal
            reason = f"{type(e).__name__}: {_reason(e)}"
            rows.append({**row, "status": "skipped", "reason": reason, "traceback": traceback.format_exc(limit=3)})
            log(f"  {name:15s} skipped: {reason}")
            continue
        finally:
            if backend is not None:
                try:
                    backend.close()
                except Exception:  # noqa: S110 - closing is best effort
                    pass
        peak = peak_for(dev, spec.peak_precision(device))
        sec = timing.median
        tflops = flops_batch / sec / 1e12
        peak_tf = peak.get("tflops") if peak else None
        row.update(
            status="ok",
            backend=getattr(backend, "name", type(backend).__name__),
            timing=timing.to_dict(),
            ms_per_tile=sec / b * 1e3,
            lr_mpix_s=b * t * t / sec / 1e6,
            tflops=tflops,
            peak_key=f"{dev}-{spec.peak_precision(device)}",
            pct_peak=100.0 * tflops / peak_tf if peak_tf else None,
            peak_rss_mb=mem.peak_rss / MB,
            added_rss_mb=mem.added_rss / MB,
            peak_gpu_mb=None if mem.peak_gpu is None else mem.peak_gpu / MB,
            **error_stats(out, reference),
        )
        rows.append(row)
        log(f"  {name:15s} {row['ms_per_tile']:9.2f} ms/tile  {row['lr_mpix_s']:8.4f} MP/s  "
            f"max|err| {row['max_abs_err']:.2e}")
    result["paths"] = rows
    result["peaks"] = peaks

    # scaling and overhead, through the tiled runtime on the PyTorch fp32 path
    result["scaling"] = result["overhead"] = None
    result["default_plan"] = None
    if cfg.scaling_sizes or cfg.overhead_hw:
        _runtime_sections(cfg, model, device, workdir, result, log)
    result["startup"] = None
    if cfg.startup and device == "cpu":
        result["startup"] = _startup_section(cfg, model, workdir, log)
    tmp.cleanup()
    return result


def _startup_section(cfg: BenchConfig, model: Any, workdir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Cold and warm start in fresh processes (the tiny model is saved as a weights file first)."""
    import torch

    from medsr.bench.startup import measure_startup

    spec = cfg.model
    if spec == TINY:
        spec = str(workdir / "tiny.pth")
        torch.save({"params_ema": model.state_dict()}, spec)
    rows = measure_startup(spec, tile=cfg.tile)
    for r in rows:
        if r["status"] == "ok":
            log(f"  start-up {r['path']:14s} {r['phase']}: {r['to_first_pixel_s']:.2f} s to the first pixel "
                f"(load {r['load_s']:.2f} s, process {r['process_s']:.2f} s)")
        else:
            log(f"  start-up {r['path']:14s} {r['phase']}: {r['status']}")
    return rows


def _runtime_sections(cfg: BenchConfig, model: Any, device: str, workdir: Path, result: dict[str, Any],
                      log: Callable[[str], None]) -> None:
    from medsr.bench.scaling import default_plan_overheads, measure_overhead, run_scaling

    try:
        from medsr.runtime import TileConfig
    except ImportError as e:
        reason = f"tiled runtime not available ({_reason(e)})"
        result["scaling"] = {"skipped": reason}
        result["overhead"] = {"skipped": reason}
        log(f"  scaling/overhead skipped: {reason}")
        return
    backend = build_backend(get_path("torch-fp32-cl"), model, device, workdir, tile=cfg.tile, batch=cfg.batch)
    try:
        if cfg.scaling_sizes:
            sc = TileConfig(tile=cfg.scaling_tile, overlap=cfg.scaling_overlap, batch=cfg.batch)
            try:
                result["scaling"] = run_scaling(backend, cfg.scaling_sizes, sc, repeats=3)
                fit = result["scaling"]["time_fit"]
                log(f"  scaling: {len(cfg.scaling_sizes)} sizes, time R^2 {fit['r2']:.4f}, "
                    f"working memory slope {result['scaling']['memory_fit']['slope']:.1f} MB/MP")
            except Exception as e:
                result["scaling"] = {"skipped": f"{type(e).__name__}: {_reason(e)}"}
                log(f"  scaling skipped: {result['scaling']['skipped']}")
        if cfg.overhead_hw:
            oc = TileConfig() if cfg.overhead_default_tile else TileConfig(tile=cfg.scaling_tile, overlap=cfg.scaling_overlap)
            oc_batch = TileConfig(tile=oc.tile, overlap=oc.overlap, batch=cfg.batch) if not cfg.overhead_default_tile else oc
            try:
                h, w = cfg.overhead_hw
                result["overhead"] = measure_overhead(backend, h, w, oc_batch, repeats=max(1, min(cfg.repeats, 3)))
                log(f"  overhead: end-to-end / model = {result['overhead']['overhead_ratio']:.3f}, "
                    f"extra pixels {result['overhead']['extra_pixel_ratio']:.3f}")
            except Exception as e:
                result["overhead"] = {"skipped": f"{type(e).__name__}: {_reason(e)}"}
                log(f"  overhead skipped: {result['overhead']['skipped']}")
            try:
                result["default_plan"] = default_plan_overheads(backend, [(1024, 1024), (3000, 2500)])
            except Exception as e:
                result["default_plan"] = {"skipped": f"{type(e).__name__}: {_reason(e)}"}
    finally:
        backend.close()
