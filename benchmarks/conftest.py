"""Fixtures for the pytest-benchmark suites (not collected by the normal test run).

    .venv/bin/pytest benchmarks/ --benchmark-only                 # tiny model, minutes on a CPU
    MEDSR_BENCH_REAL=1 .venv/bin/pytest benchmarks/ --benchmark-only   # real RealESRGAN_x4plus

Environment: ``MEDSR_BENCH_REAL=1`` (real x4plus instead of the tiny RRDB), ``MEDSR_BENCH_MODEL``
(a name or weights file; implies real sizes), ``MEDSR_BENCH_DEVICE`` (auto | cpu | cuda).
A path that cannot run here (no CUDA, no TensorRT, no onnxruntime-gpu, torch.compile failing) is a
pytest skip whose reason says why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))

MODEL_SPEC = os.environ.get("MEDSR_BENCH_MODEL") or ("realesrgan-x4plus" if os.environ.get("MEDSR_BENCH_REAL") == "1" else "tiny")
REAL = MODEL_SPEC != "tiny"
_DEV = os.environ.get("MEDSR_BENCH_DEVICE", "auto")
DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if _DEV == "auto" else _DEV
GPU = DEVICE == "cuda"

# LR tile sizes and batches per backend benchmark; LR image sizes for the end-to-end benchmark
if GPU:
    TILES, BATCHES = [128, 256, 512], [1, 4]
    E2E_SIZES = [(1024, 1024), (3000, 2500)]  # -> 4096x4096 and 12000x10000
    E2E_TILE, ROUNDS = 256, 5
elif REAL:
    TILES, BATCHES = [32, 64], [1, 2]
    E2E_SIZES = [(128, 128), (300, 250)]  # scaled down: a 2-core CPU does ~0.05 LR MP/min with x4plus
    E2E_TILE, ROUNDS = 64, 2
else:
    TILES, BATCHES = [32, 64], [1, 4]
    E2E_SIZES = [(256, 256), (600, 500)]  # the GPU sizes / 4 and / 5
    E2E_TILE, ROUNDS = 128, 3


def pytest_report_header(config: pytest.Config) -> str:
    return f"medsr benchmarks: model={MODEL_SPEC} device={DEVICE} tiles={TILES} batches={BATCHES} e2e={E2E_SIZES}"


@pytest.fixture(scope="session")
def bench_device() -> str:
    if GPU and not torch.cuda.is_available():
        pytest.skip("MEDSR_BENCH_DEVICE=cuda but no CUDA device")
    return DEVICE


@pytest.fixture(scope="session")
def bench_model() -> Any:
    from medsr.bench.runner import load_bench_model

    try:
        model, _, _ = load_bench_model(MODEL_SPEC)
    except Exception as e:  # weights not available offline, etc.
        pytest.skip(f"model {MODEL_SPEC!r} not available: {type(e).__name__}: {e}")
    return model


@pytest.fixture(scope="session")
def bench_workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="medsr-benchmarks-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def backend_for(bench_model: Any, bench_device: str, bench_workdir: Path) -> Iterator[Callable[..., Any]]:
    """``backend_for(path_name, tile, batch)``: a cached Backend, or pytest.skip with the reason."""
    from medsr.bench.paths import PathSkipped, build_backend, get_path

    cache: dict[tuple[Any, ...], Any] = {}
    failed: dict[tuple[Any, ...], str] = {}

    def get(name: str, tile: int, batch: int) -> Any:
        spec = get_path(name)
        key = (name, tile, batch) if spec.kind == "tensorrt" else (name,)  # engines have fixed profiles
        if key in failed:
            pytest.skip(failed[key])
        if key not in cache:
            try:
                cache[key] = build_backend(spec, bench_model, bench_device, bench_workdir, tile=tile, batch=batch)
            except PathSkipped as e:
                failed[key] = f"{name}: {e}"
                pytest.skip(failed[key])
        return cache[key]

    yield get
    for b in cache.values():
        b.close()
