"""Shared fixtures. Tests are CPU-only and fast: tiny RRDB configs, synthetic images.

Real samples in ../shared/data are optional: tests that use them skip when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's weight cache from tests."""
    monkeypatch.setenv("MEDSR_HOME", str(tmp_path_factory.mktemp("medsr_home")))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not present at {SHARED_DATA}")
    return SHARED_DATA


def tiny_rrdb(scale: int = 4, channels: int = 3, seed: int = 0, num_feat: int = 8, num_block: int = 1, num_grow_ch: int = 4):
    """A seeded tiny RRDBNet (BasicSR layout), eval mode."""
    from medsr.arch import RRDBNet

    g = torch.Generator().manual_seed(seed)
    m = RRDBNet(channels, channels, scale, num_feat, num_block, num_grow_ch)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny models on a shared 2-core machine run faster so)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
