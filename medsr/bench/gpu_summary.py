"""The summary of one ``benchmarks/gpu/run.sh`` run: ``python -m medsr.bench.gpu_summary RUN_DIR ENV STEPS``.

Reads the step folders the script wrote (``bench-paths``, ``bench-batch<N>``, ``pipeline.json``, the sampled
``nvidia-smi-memory.csv``) and prints one markdown page: environment, step status, the path table with % of the
GEMM peak measured in the same run, batch scaling, the end-to-end pipeline and the peak GPU memory.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    return v if isinstance(v, str) else format(v, fmt)  # JSON writes inf as "inf"


def _rows(result: dict[str, Any], batch: int | None = None) -> list[str]:
    out = []
    for r in result.get("paths", []):
        if r.get("status") != "ok":
            if "not selected" not in str(r.get("reason", "")):
                out.append(f"| {r['path']} | {batch or '-'} | skipped: {r.get('reason', '')} | | | | | |")
            continue
        out.append(f"| {r['path']} | {batch or result['config']['batch']} | {_f(r['ms_per_tile'], '.2f')} | "
                   f"{_f(r['lr_mpix_s'], '.3f')} | {_f(r['tflops'], '.2f')} | {_f(r.get('pct_peak'), '.0f')} % "
                   f"({r.get('peak_key', '')}) | {_f(r.get('peak_gpu_mb'), '.0f')} | {_f(r.get('psnr_db'), '.1f')} |")
    return out


def summarize(run: Path, env: Path, steps: Path) -> str:
    lines = ["# GPU run (benchmarks/gpu/run.sh)", "", "## Environment", "", "```",
             env.read_text().strip() if env.is_file() else "missing", "```", "", "## Steps", "",
             "| step | status | seconds |", "|---|---|---:|"]
    if steps.is_file():
        for row in list(csv.reader(steps.open(), delimiter="\t"))[1:]:
            lines.append("| " + " | ".join(row) + " |")
    head = ["| path | batch | ms/tile | LR MP/s | TFLOP/s | % of GEMM peak (same run) | peak GPU MB (torch) | "
            "PSNR vs fp32 |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    paths = run / "bench-paths" / "results.json"
    lines += ["", "## Paths", ""]
    if paths.is_file():
        res = json.loads(paths.read_text())
        peaks = {k: _f(v.get("tflops"), ".3g") for k, v in res.get("peaks", {}).items()}
        lines += [f"Model {res['model']['id']}, tile {res['config']['tile']}; GEMM peaks measured (TFLOP/s): "
                  f"{peaks}", "", *head, *_rows(res)]
    else:
        lines.append("no results (see the bench-paths log)")
    lines += ["", "## Batch size", "", *head]
    for d in sorted((p for p in run.glob("bench-batch*") if p.is_dir()),
                    key=lambda p: int(p.name.removeprefix("bench-batch") or 0)):
        f = d / "results.json"
        if f.is_file():
            lines += _rows(json.loads(f.read_text()), int(d.name.removeprefix("bench-batch")))
    lines += ["", "## End to end (read -> upscale -> encode, overlapped)", ""]
    pipe = run / "pipeline.json"
    if pipe.is_file():
        from medsr.bench.pipeline import markdown

        lines.append(markdown(json.loads(pipe.read_text())))
    else:
        lines.append("no results (see the pipeline log)")
    smi = run / "nvidia-smi-memory.csv"
    if smi.is_file():
        used = []
        for row in list(csv.reader(smi.open()))[1:]:
            try:
                used.append(float(row[1].strip().split()[0]))
            except (IndexError, ValueError):
                continue
        if used:
            lines += ["", f"Peak GPU memory over the whole run (nvidia-smi, every 0.5 s): {max(used):.0f} MiB"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_dir, env_file, steps_file = (Path(a) for a in sys.argv[1:4])
    sys.stdout.write(summarize(run_dir, env_file, steps_file))
