"""Start-up: cold and warm time to the first output pixel, each in a fresh process.

``Upscaler.load`` + one tile-sized image, in a child process (imports included in ``process_s``), twice per
row on one fresh medsr cache folder (``MEDSR_HOME``): **cold** (nothing cached: OpenVINO converts the
weights and compiles the tile shape) and **warm** (the converted IR and the compiled blob are read from the
cache, see ``medsr.runtime.openvino_backend.compile_cache_dir``). PyTorch has no cache and is the baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: (name, runtime, precision or "" for the automatic one)
STARTUP_ROWS: tuple[tuple[str, str, str], ...] = (("torch-fp32", "torch", "fp32"), ("openvino-auto", "openvino", ""))

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from medsr.api import Upscaler
spec, runtime, precision, tile = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
t1 = time.perf_counter()
up = Upscaler.load(spec, runtime=runtime, device="cpu", precision=precision, tile=tile)
t2 = time.perf_counter()
up(np.zeros((tile, tile), np.uint16))
t3 = time.perf_counter()
print("MEDSR_START " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2,
                                    "to_first_pixel_s": t3 - t1, "ran": up.describe()}))
"""


def _child(spec: str, runtime: str, precision: str, tile: int, home: Path) -> dict[str, Any]:
    import time

    env = {**os.environ, "MEDSR_HOME": str(home)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, spec, runtime, precision, str(tile)], capture_output=True,
                       text=True, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("MEDSR_START ")), None)
    if r.returncode or line is None:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"skipped: {why}"}
    return {"status": "ok", "process_s": time.perf_counter() - t0, **json.loads(line.split(" ", 1)[1])}


def measure_startup(spec: str, *, tile: int = 64, rows: tuple[tuple[str, str, str], ...] = STARTUP_ROWS,
                    home: Path | None = None) -> list[dict[str, Any]]:
    """Cold then warm start of each row on one fresh cache folder per row (under ``home``: a temporary
    folder). ``spec``: a registered name or a weights file (a registered name is passed as its file, so the
    fresh cache folder needs no copy of downloaded weights)."""
    from medsr.weights.registry import cached_path, find_entry

    entry = find_entry(spec)
    if entry is not None and cached_path(entry).is_file():
        spec = str(cached_path(entry))
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medsr-startup-") as tmp:
        base = Path(home) if home else Path(tmp)
        for name, runtime, precision in rows:
            h = base / name
            h.mkdir(parents=True, exist_ok=True)
            for phase in ("cold", "warm"):
                out.append({"path": name, "phase": phase, "tile": tile,
                            **_child(spec, runtime, precision, tile, h)})
    return out


def startup_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["not run", ""]
    out = ["Fresh process each: `Upscaler.load` + one tile-sized image (time to the first output pixel); "
           "cold = empty cache folder, warm = the same folder again.", "",
           "| path | phase | load (s) | first image (s) | to first pixel (s) | process incl. imports (s) | ran |",
           "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['path']} | {r['phase']} | - | - | - | - | {r['status']} |")
            continue
        out.append(f"| {r['path']} | {r['phase']} | {r['load_s']:.2f} | {r['first_image_s']:.2f} | "
                   f"{r['to_first_pixel_s']:.2f} | {r['process_s']:.2f} | {r['ran']} |")
    return out + [""]
