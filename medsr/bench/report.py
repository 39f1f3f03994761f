"""Write a benchmark result as JSON, a markdown report and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
import re
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

JSON_NAME = "results.json"
MD_NAME = "results.md"
PATHS_PNG = "paths.png"
SCALING_PNG = "scaling.png"


def default_out_dir(root: str | Path = "benchmarks/results") -> Path:
    """``<root>/<host>-<YYYYmmdd-HHMMSS>``."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname()) or "host"
    return Path(root) / f"{host}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _f(v: Any, fmt: str = ".3g", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def paths_table(result: dict[str, Any]) -> str:
    """The main table: one row per path, skipped paths with their reason."""
    head = ("| path | device | ms/tile | LR MP/s | TFLOP/s | % of GEMM peak | peak RSS MB | peak GPU MB "
            "| max abs err | mean abs err (x255) | PSNR dB vs fp32 | 16-bit round trip |")
    lines = [head, "|" + "---|" * 12]
    for r in result["paths"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['path']} | skipped: {r.get('reason', '?')} |" + "  |" * 10)
            continue
        mean = r.get("mean_abs_err")
        rt = r.get("roundtrip16")
        lines.append(
            f"| {r['path']} | {r.get('device', '')} | {_f(r['ms_per_tile'], '.2f')} | {_f(r['lr_mpix_s'], '.4g')} "
            f"| {_f(r['tflops'], '.3g')} | {_f(r.get('pct_peak'), '.1f')} | {_f(r['peak_rss_mb'], '.0f')} "
            f"| {_f(r.get('peak_gpu_mb'), '.0f')} | {_f(r['max_abs_err'], '.2e')} "
            f"| {_f(None if mean is None else mean * 255, '.3g')} | {_f(r['psnr_db'], '.2f')} "
            f"| {'-' if rt is None else ('ok' if rt else 'FAILS')} |"
        )
    best = fastest_accurate(result, "cpu")
    if best:
        lines += ["", f"Fastest CPU path within 0.5/255 mean error of fp32 whose output passes the 16-bit round trip: "
                      f"**{best}**."]
    return "\n".join(lines)


#: the accuracy bar for a default path: mean abs error vs fp32 at most half a grey level of 8 bits
MEAN_ERROR_BAR = 0.5 / 255


def fastest_accurate(result: dict[str, Any], device: str) -> str | None:
    """The fastest ``device`` path whose mean error vs fp32 is within :data:`MEAN_ERROR_BAR` and whose
    output passes the 16-bit round trip (None: no such path measured)."""
    ok = [r for r in result["paths"] if r.get("status") == "ok" and r.get("device") == device
          and r.get("mean_abs_err") is not None and r["mean_abs_err"] <= MEAN_ERROR_BAR and r.get("roundtrip16")]
    return min(ok, key=lambda r: r["ms_per_tile"])["path"] if ok else None


def render_markdown(result: dict[str, Any], pngs: dict[str, str] | None = None) -> str:
    m, cfg, model = result["meta"], result["config"], result["model"]
    d = model["descriptor"]
    out = [
        f"# medsr-bench: {m['host']} ({m['date']})",
        "",
        f"- device: **{m['device']}**" + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; CPU: {m['processor']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}",
        f"- torch {m['torch']}, onnxruntime {m.get('onnxruntime') or '-'}, python {m['python']}",
        f"- model: `{model['id']}` (x{d['scale']}, {d['in_channels']}->{d['out_channels']} ch, num_feat {d['num_feat']}, "
        f"num_block {d['num_block']}, grow {d['num_grow_ch']}; {model['params']:,} parameters)",
        f"- analytic cost: {result['flops']['flops_per_lr_pixel'] / 1e6:.3f} MFLOP per LR pixel (2 x MACs)",
        f"- inputs: batch {cfg['batch']} x {cfg['tile']}x{cfg['tile']} LR tiles, {cfg['repeats']} timed repeats "
        f"(median), {cfg['warmup']} warm-up; preset `{cfg['preset']}`",
        "",
        "## Inference paths",
        "",
        paths_table(result),
        "",
        "Error columns compare each path's output with plain PyTorch fp32 on the same device and input. "
        "% of GEMM peak: achieved model TFLOP/s over the best square GEMM in the path's precision "
        "(`torch.matmul`, and OpenVINO's MatMul on the CPU), "
        "measured in this run:",
        "",
    ]
    for key, p in sorted(result.get("peaks", {}).items()):
        tried = ", ".join(f"{k}: {t:.3g}" for k, t in (p.get("tried") or {}).items())
        out.append(f"- {key}: " + (f"{p['tflops']:.3g} TFLOP/s ({p.get('library', 'torch')}, n={p['n']}; tried {tried or p['n']})"
                                   if p.get("tflops") else f"n/a ({p.get('error')})"))
    out.append("")
    if pngs and PATHS_PNG in pngs:
        out += [f"![paths]({PATHS_PNG})", ""]

    sc = result.get("scaling")
    out += ["## Scaling with image size (tiled runtime, PyTorch fp32 channels_last)", ""]
    if not sc:
        out += ["not run", ""]
    elif "skipped" in sc:
        out += [f"skipped: {sc['skipped']}", ""]
    else:
        tf, mf = sc["time_fit"], sc["memory_fit"]
        out += [
            f"Tile {sc['tile']}, overlap {sc['overlap']}, batch {sc['batch']}.",
            "",
            "| LR size | LR MP | tiles | time s | working memory MB | one strip MB | peak GPU MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in sc["points"]:
            out.append(f"| {p['lr_hw'][0]}x{p['lr_hw'][1]} | {p['lr_mpix']:.4f} | {p['num_tiles']} | {p['seconds']:.3f} "
                       f"| {p['working_mb']:.1f} | {p['strip_mb']:.1f} | {_f(p.get('peak_gpu_mb'), '.0f')} |")
        out += [
            "",
            f"- time vs LR pixels: linear fit R^2 = **{tf['r2']:.4f}** "
            f"({tf['slope']:.3g} s per LR megapixel, intercept {tf['intercept']:.3g} s)",
            f"- working memory (host RSS above input + preallocated output) vs LR pixels: slope "
            f"**{mf['slope']:.3g} MB per LR megapixel** (R^2 {mf['r2']:.3f}); at most "
            f"**{sc['max_working_per_strip']:.2f}x one strip** (the strip accumulator grows with the image width, "
            f"not its area), against {sc['output_mb_largest']:.1f} MB for the largest float32 output",
        ]
        if "gpu_memory_fit" in sc:
            out.append(f"- peak GPU memory slope: {sc['gpu_memory_fit']['slope']:.3g} MB per LR megapixel")
        out.append("")
        if pngs and SCALING_PNG in pngs:
            out += [f"![scaling]({SCALING_PNG})", ""]

    ov = result.get("overhead")
    out += ["## Runtime overhead", ""]
    if not ov:
        out += ["not run", ""]
    elif "skipped" in ov:
        out += [f"skipped: {ov['skipped']}", ""]
    else:
        out += [
            f"LR {ov['lr_hw'][0]}x{ov['lr_hw'][1]}, tile {ov['tile']}, overlap {ov['overlap']}, batch {ov['batch']}: "
            f"{ov['num_tiles']} tiles of {ov['tile_hw'][0]}x{ov['tile_hw'][1]}.",
            "",
            f"- end-to-end `upscale_array` {ov['end_to_end_s']:.4g} s / pure `backend.run` on the same tiles "
            f"{ov['model_s']:.4g} s = **{ov['overhead_ratio']:.3f}x** (best of interleaved repeats)",
            f"- extra pixels computed because of overlap: **{100 * ov['extra_pixel_ratio']:.1f}%** "
            "(`plan.extra_pixel_ratio`)",
        ]
    dp = result.get("default_plan")
    if isinstance(dp, list):
        for p in dp:
            out.append(f"- default TileConfig (tile {p['tile']}, overlap {p['overlap']}) on LR {p['lr_hw'][0]}x{p['lr_hw'][1]}: "
                       f"{p['num_tiles']} tiles, extra pixels {100 * p['extra_pixel_ratio']:.1f}%")
    out.append("")
    if result.get("startup") is not None:
        from medsr.bench.startup import startup_markdown

        out += ["## Start-up (cold and warm)", "", *startup_markdown(result["startup"])]
    return "\n".join(out)


def plot_paths(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["paths"]
    names = [r["path"] for r in rows]
    vals = [r["lr_mpix_s"] if r.get("status") == "ok" else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    bars = ax.barh(names, vals, color=["tab:blue" if v else "lightgray" for v in vals])
    for bar, r in zip(bars, rows, strict=True):
        label = f" {r['lr_mpix_s']:.3g}" if r.get("status") == "ok" else " skipped"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("LR megapixels / s (higher is better)")
    m = result["meta"]
    ax.set_title(f"medsr-bench {result['model']['id']} on {m['device']} ({m['host']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result["scaling"]
    mp = [p["lr_mpix"] for p in sc["points"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    tf = sc["time_fit"]
    a1.plot(mp, [p["seconds"] for p in sc["points"]], "o", label="measured")
    a1.plot([0, max(mp)], [tf["intercept"], tf["intercept"] + tf["slope"] * max(mp)], "-",
            label=f"fit, R^2={tf['r2']:.4f}")
    a1.set_xlabel("LR megapixels")
    a1.set_ylabel("time (s)")
    a1.set_title("time vs image size")
    a1.legend()
    a2.plot(mp, [p["working_mb"] for p in sc["points"]], "o-", label="host working memory")
    a2.plot(mp, [p["strip_mb"] for p in sc["points"]], "--", color="gray", label="one HR strip (float32)")
    if sc["points"][0].get("peak_gpu_mb") is not None:
        a2.plot(mp, [p["peak_gpu_mb"] for p in sc["points"]], "s-", label="peak GPU allocated")
    a2.set_xlabel("LR megapixels")
    a2.set_ylabel("MB")
    a2.set_ylim(bottom=0)
    a2.set_title(f"memory vs image size (slope {sc['memory_fit']['slope']:.3g} MB/MP)")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write results.json, results.md, paths.png and (when scaling ran) scaling.png; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    plot_paths(result, out / PATHS_PNG)
    files[PATHS_PNG] = str(out / PATHS_PNG)
    sc = result.get("scaling")
    if sc and "points" in sc:
        plot_scaling(result, out / SCALING_PNG)
        files[SCALING_PNG] = str(out / SCALING_PNG)
    (out / MD_NAME).write_text(render_markdown(result, files), encoding="utf-8")
    files[MD_NAME] = str(out / MD_NAME)
    (out / JSON_NAME).write_text(json.dumps(_jsonable(result), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    files[JSON_NAME] = str(out / JSON_NAME)
    return files
