"""Memory table: peak RSS of a whole ``medsr-infer`` run per CPU path, each in its own process.

One synthetic 16-bit radiograph (default 3000 x 2500, PNG) is upscaled end to end (read, tiles, blend,
write) by ``medsr-infer`` with each path's engine and runtime; the child reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) and wall time. Paths whose engine cannot run here are listed as skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: (name, file kind, runtime, precision): the CPU paths of medsr-infer (precision "": none given)
CPU_PATHS: tuple[tuple[str, str, str, str], ...] = (
    ("default", "weights", "auto", ""),  # what medsr-infer runs with neither --runtime nor --precision
    ("torch-fp32", "weights", "torch", "fp32"),
    ("torch-bf16", "weights", "torch", "bf16"),
    ("ort-cpu-fp32", "onnx", "onnxruntime", "fp32"),
    ("openvino-fp32", "onnx", "openvino", "fp32"),
    ("openvino-bf16", "onnx", "openvino", "bf16"),
)

_CHILD = """
import resource, sys, time
from medsr.cli.infer import main
t0 = time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
    rc = 0
except SystemExit as e:
    rc = e.code or 0
print("MEDSR_MEM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, round(time.perf_counter() - t0, 2), rc)
"""


@dataclass
class MemoryRow:
    path: str
    peak_rss_gb: float | None
    seconds: float | None
    status: str


def make_input(folder: Path, h: int, w: int) -> Path:
    import cv2
    import numpy as np

    from medsr.bench.measure import synthetic_radiograph

    p = folder / f"synthetic_{w}x{h}_16bit.png"
    cv2.imwrite(str(p), np.rint(synthetic_radiograph(h, w) * 65535).astype(np.uint16))
    return p


def run_memory(
    model: str, *, size: tuple[int, int] = (3000, 2500), paths: list[str] | None = None, tile: int | None = None,
    log: Any = print,
) -> list[MemoryRow]:
    """Run each CPU path on one ``size`` (height, width) 16-bit image; returns the rows."""
    rows: list[MemoryRow] = []
    with tempfile.TemporaryDirectory(prefix="medsr-mem-") as tmp:
        work = Path(tmp)
        src = make_input(work, *size)
        onnx_path: Path | None = None
        for name, kind, runtime, precision in CPU_PATHS:
            if paths and name not in paths:
                continue
            engine = model
            if kind == "onnx":
                if onnx_path is None:
                    try:
                        onnx_path = _export(model, work / "model.onnx")
                    except Exception as e:  # no onnx package, ...
                        rows.append(MemoryRow(name, None, None, f"skipped: cannot export ONNX ({e})"))
                        continue
                engine = str(onnx_path)
            args = ["--quiet", "--device", "cpu", "--runtime", runtime, *(["--precision", precision] if precision else []),
                    "--engine" if kind == "onnx" or Path(model).suffix else "--model", engine,
                    str(src), "-o", str(work / f"out-{name}")]
            if tile:
                args += ["--tile", str(tile)]
            log(f"memory: {name} on {size[1]}x{size[0]} ...")
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("MEDSR_MEM")), None)
            if line is None or line.split()[3] != "0":
                why = (r.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append(MemoryRow(name, None, round(time.perf_counter() - t0, 1), f"skipped: {why}"))
            else:
                _, rss, secs, _ = line.split()
                rows.append(MemoryRow(name, round(int(rss) / 1e9, 3), float(secs), "ok"))
            log(f"memory: {rows[-1]}")
    return rows


def _export(model: str, path: Path) -> Path:
    from medsr.export import export_onnx
    from medsr.weights import load_model

    lm = load_model(model)
    export_onnx(lm.model, path, model_id=lm.model_id, weights_sha256=lm.sha256, parity=False)
    return path


def memory_markdown(rows: list[MemoryRow], model: str, size: tuple[int, int], limit_gb: float = 1.5) -> str:
    lines = [f"Peak RSS of one `medsr-infer` run, {size[1]}x{size[0]} 16-bit PNG, x4 -> {size[1] * 4}x{size[0] * 4}, "
             f"model {model}, CPU (target <= {limit_gb} GB):", "",
             "| path | peak RSS (GB) | wall (s) | status |", "|---|---|---|---|"]
    for r in rows:
        rss = f"{r.peak_rss_gb:.2f}" if r.peak_rss_gb is not None else "-"
        sec = f"{r.seconds:.0f}" if r.seconds is not None else "-"
        lines.append(f"| {r.path} | {rss} | {sec} | {r.status} |")
    return "\n".join(lines) + "\n"


def write_memory(rows: list[MemoryRow], out: Path, model: str, size: tuple[int, int]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"model": model, "size_hw": list(size),
                                                 "rows": [r.__dict__ for r in rows]}, indent=1))
    (out / "memory.md").write_text(memory_markdown(rows, model, size))
    return {"memory.json": out / "memory.json", "memory.md": out / "memory.md"}
