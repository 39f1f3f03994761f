"""Per backend, precision, tile size and batch: one ``Backend.run`` call (model time only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import BATCHES, ROUNDS, TILES

from medsr.bench.measure import model_flops, synchronize
from medsr.bench.paths import PATH_NAMES, PathSkipped


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("path", PATH_NAMES)
def test_backend_run(benchmark: Any, backend_for: Callable[..., Any], path: str, tile: int, batch: int) -> None:
    backend = backend_for(path, tile, batch)
    benchmark.group = f"backend tile{tile} batch{batch}"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, backend.channels, tile, tile, generator=g).to(backend.device)

    def run() -> None:
        backend.run(x)
        synchronize(backend.device)

    try:
        run()  # first call: compilation / engine warm-up, not timed
    except Exception as e:  # e.g. torch.compile failing at its first call
        raise pytest.skip.Exception(f"{path}: {type(e).__name__}: {e}") from PathSkipped(str(e))
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    sec = benchmark.stats.stats.median
    flops = model_flops(backend.descriptor, batch * tile * tile)
    benchmark.extra_info.update(
        path=path,
        precision=backend.precision,
        device=str(backend.device),
        ms_per_tile=sec / batch * 1e3,
        lr_mpix_s=batch * tile * tile / sec / 1e6,
        tflops=flops / sec / 1e12,
    )
