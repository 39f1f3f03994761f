"""End to end on a 16-bit radiograph PNG: read, tile, infer, blend, write (PyTorch backends).

GPU: 1024x1024 -> 4096x4096 and 3000x2500 -> 12000x10000. CPU: smaller (see conftest.E2E_SIZES).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import E2E_SIZES, E2E_TILE, GPU, ROUNDS

from medsr.bench.measure import synthetic_radiograph

E2E_PATHS = ["torch-fp32-cl", "torch-fp16-cl" if GPU else "torch-bf16-cl"]


def _radiograph_png(path: Path, h: int, w: int) -> Path:
    from medsr.io import Image, write_image

    px = np.rint(synthetic_radiograph(h, w, seed=3) * 65535).astype(np.uint16)
    return write_image(Image(pixels=px, format="png", max_value=65535), path)


@pytest.mark.parametrize("path", E2E_PATHS)
@pytest.mark.parametrize("hw", E2E_SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_end_to_end_file(benchmark: Any, bench_model: Any, bench_device: str, bench_workdir: Path,
                         hw: tuple[int, int], path: str) -> None:
    from medsr.api import Upscaler
    from medsr.arch import fold_to_gray
    from medsr.bench.paths import PathSkipped, build_backend, get_path
    from medsr.runtime import TileConfig

    spec = get_path(path)
    try:
        backend = build_backend(spec, bench_model, bench_device, bench_workdir)
        gray = build_backend(spec, fold_to_gray(bench_model), bench_device, bench_workdir)
    except PathSkipped as e:
        pytest.skip(f"{path}: {e}")
    cfg = TileConfig(tile=E2E_TILE, overlap=16, batch=4 if GPU else 1)
    up = Upscaler(backend, cfg, model_id="bench", variants={1: gray})
    h, w = hw
    src = _radiograph_png(bench_workdir / f"cxr-{h}x{w}.png", h, w)
    dst = bench_workdir / f"cxr-{h}x{w}-x{backend.scale}-{path}.png"
    benchmark.group = f"end-to-end {h}x{w}"

    def run() -> None:
        up.upscale_file(src, dst, overwrite=True)

    benchmark.pedantic(run, rounds=ROUNDS if h * w < 2_000_000 else 2, iterations=1, warmup_rounds=0)
    sec = benchmark.stats.stats.median
    s = backend.scale
    benchmark.extra_info.update(path=path, lr_hw=[h, w], hr_hw=[h * s, w * s], lr_mpix_s=h * w / sec / 1e6,
                                tile=cfg.tile, overlap=cfg.overlap, batch=cfg.batch)
    assert dst.is_file()
    backend.close()
    gray.close()
