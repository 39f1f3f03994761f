"""Tiled runtime: geometry, exactness for local operators, partition of unity, streaming, validation, NaN policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from medsr.arch.descriptor import ModelDescriptor
from medsr.runtime import (
    Backend,
    NonFiniteOutputError,
    TileConfig,
    TileLimits,
    iter_strips,
    plan_tiles,
    upscale_array,
)


def _desc(scale: int, channels: int, multiple: int = 1) -> ModelDescriptor:
    return ModelDescriptor("test", scale, channels, channels, 1, 1, 1, size_multiple=multiple)


class NearestBackend(Backend):
    """Pointwise: nearest-neighbour upsampling (receptive field 0)."""

    name = "nearest"

    def __init__(self, scale: int = 4, channels: int = 1, multiple: int = 1, limits: TileLimits | None = None):
        self.descriptor = _desc(scale, channels, multiple)
        self._limits = limits
        self.calls: list[int] = []

    def tile_limits(self) -> TileLimits:
        return self._limits or super().tile_limits()

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append(batch.shape[0])
        s = self.scale
        return batch.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)


class ConvBackend(NearestBackend):
    """Two 3x3 convolutions (zero padding, receptive radius 2 LR pixels) then nearest upsampling."""

    name = "conv"

    def __init__(self, scale: int = 4, channels: int = 1, multiple: int = 1):
        super().__init__(scale, channels, multiple)
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(4, channels, 3, 3, generator=g) * 0.3
        self.w2 = torch.randn(channels, 4, 3, 3, generator=g) * 0.3

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.double()  # float64 so that different tile shapes round alike
        y = F.conv2d(torch.tanh(F.conv2d(x, self.w1.double(), padding=1)), self.w2.double(), padding=1)
        return super().run(y.float())


def _whole(backend: Backend, img: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    return backend.run(x)[0].permute(1, 2, 0).numpy()


def _pad_reflect(img: np.ndarray, hp: int, wp: int) -> np.ndarray:
    h, w = img.shape[:2]
    mode_h = "reflect" if h > 1 else "edge"
    img = np.pad(img, ((0, hp - h), (0, 0), (0, 0)), mode=mode_h)
    mode_w = "reflect" if w > 1 else "edge"
    return np.pad(img, ((0, 0), (0, wp - w), (0, 0)), mode=mode_w)


@pytest.mark.parametrize("hw", [(37, 53), (61, 29), (33, 33)])
@pytest.mark.parametrize("cfg", [TileConfig(16, 4, 2, 3), TileConfig(20, 8, 2, 2), TileConfig(24, 6, 3, 4)])
@pytest.mark.parametrize("fit", [True, False])
def test_conv_tiled_equals_whole(rng, hw, cfg, fit):
    cfg = replace(cfg, fit=fit)
    b = ConvBackend(scale=2, channels=2)
    img = rng.random((*hw, 2), dtype=np.float32)
    got = upscale_array(b, img, cfg)
    np.testing.assert_allclose(got, _whole(b, img), atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(1, 1), (1, 37), (41, 1), (5, 9), (10, 3)])
@pytest.mark.parametrize("fit", [True, False])
def test_small_and_thin_images(rng, hw, fit):
    cfg = TileConfig(12, 4, 2, 2, fit=fit)
    img = rng.random((*hw, 1), dtype=np.float32)
    near = NearestBackend(scale=4)
    np.testing.assert_allclose(upscale_array(near, img, cfg), _whole(near, img), atol=1e-6, rtol=0)
    # a local operator: equals the operator on the reflect-padded image, cropped
    conv = ConvBackend(scale=4)
    plan = plan_tiles(*hw, cfg)
    ref = _whole(conv, _pad_reflect(img, *plan.padded_hw))[: hw[0] * 4, : hw[1] * 4]
    np.testing.assert_allclose(upscale_array(conv, img, cfg), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(23, 31), (9, 40), (1, 7)])
def test_x2_size_multiple_odd_sizes(rng, hw):
    cfg = TileConfig(12, 6, 2, 3)  # halo 2 = the conv receptive radius
    img = rng.random((*hw, 3), dtype=np.float32)
    near = NearestBackend(scale=2, channels=3, multiple=2)
    np.testing.assert_allclose(upscale_array(near, img, cfg), _whole(near, img), atol=1e-6, rtol=0)
    conv = ConvBackend(scale=2, channels=3, multiple=2)
    plan = plan_tiles(*hw, cfg, conv.tile_limits())
    assert plan.padded_hw[0] % 2 == 0 and plan.padded_hw[1] % 2 == 0
    assert all(y % 2 == 0 and x % 2 == 0 for y, x in plan.tiles)
    ref = _whole(conv, _pad_reflect(img, *plan.padded_hw))[: hw[0] * 2, : hw[1] * 2]
    np.testing.assert_allclose(upscale_array(conv, img, cfg), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "cfg",
    [TileConfig(16, 4), TileConfig(16, 4, 0), TileConfig(16, 8, 4), TileConfig(10, 9, 1), TileConfig(32, 16, 2, 5)],
)
@pytest.mark.parametrize("hw", [(50, 47), (17, 33)])
@pytest.mark.parametrize("fit", [True, False])
def test_constant_stays_constant(cfg, hw, fit):
    cfg = replace(cfg, fit=fit)
    img = np.full((*hw, 1), 0.37, dtype=np.float32)
    got = upscale_array(NearestBackend(scale=2), img, cfg)
    np.testing.assert_allclose(got, 0.37, atol=1e-6, rtol=0)
    # the 2-D weights are an exact partition of unity
    plan = plan_tiles(*hw, cfg)
    total = np.zeros(plan.padded_hw, dtype=np.float64)
    for (ay, wy) in plan.axis_weights(0):
        for (ax, wx) in plan.axis_weights(1):
            total[ay : ay + len(wy), ax : ax + len(wx)] += np.outer(wy, wx)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_geometry_same_size_shifted_last_and_border_weights():
    cfg = TileConfig(tile=16, overlap=4, halo=1, fit=False)
    plan = plan_tiles(45, 30, cfg)
    assert plan.tile_hw == (16, 16)
    ys = sorted({y for y, _ in plan.tiles})
    xs = sorted({x for _, x in plan.tiles})
    assert ys == [0, 12, 24, 29]  # stride 12, last shifted inward to end at 45
    assert xs == [0, 12, 14]  # [0, 14] would overlap by only 2 < 4; the last is shifted inward to 30 - 16
    assert ys[-1] + 16 == 45 and xs[-1] + 16 == 30
    assert plan.num_tiles == len(plan.tiles) == 12
    assert [len(r) for r in plan.rows] == [3, 3, 3, 3]
    assert plan.extra_pixel_ratio == pytest.approx(12 * 256 / (45 * 30) - 1)
    for axis, n in ((0, 45), (1, 30)):
        ws = plan.axis_weights(axis, scale=4)
        assert ws[0][0] == 0 and ws[0][1][0] == 1.0  # no ramp at the image border
        assert ws[-1][0] + len(ws[-1][1]) == n * 4 and ws[-1][1][-1] == 1.0
        for (a0, w0), (a1, w1) in zip(ws, ws[1:], strict=False):
            assert a1 >= a0 and np.all(np.diff(w1[: a0 + len(w0) - a1]) >= 0)  # ramps up into the next tile
        assert all(float(w.min()) > 0 for _, w in ws)
    # interior halo: the second row tile (origin 12) contributes from 12 + halo on
    assert plan.axis_weights(0)[1][0] == 12 + 1


def test_image_smaller_than_tile_is_padded():
    plan = plan_tiles(5, 7, TileConfig(tile=32, overlap=8, fit=False))
    assert plan.padded_hw == (32, 32) and plan.tiles == [(0, 0)]


def test_fit_shrinks_tiles_without_adding_any():
    for hw in [(1024, 1024), (3000, 2500), (512, 300), (45, 30)]:
        fixed = plan_tiles(*hw, TileConfig(overlap=16, fit=False))  # geometry at a pinned overlap
        fitted = plan_tiles(*hw, TileConfig(overlap=16))
        assert fitted.num_tiles == fixed.num_tiles
        assert fitted.tile_hw[0] <= 256 and fitted.tile_hw[1] <= 256
        assert fitted.extra_pixel_ratio <= fixed.extra_pixel_ratio
        # every tile of an image shares one shape, and the overlap is never below the configured one
        for ax in (fitted.y_axis, fitted.x_axis):
            starts = ax.starts
            tile = fitted.tile_hw[0] if ax is fitted.y_axis else fitted.tile_hw[1]
            assert all(b - a <= tile - 16 for a, b in zip(starts, starts[1:], strict=False))
    # 1024 px: 5 tiles of 218 instead of 5 of 256 (13 % instead of 56 % extra pixels)
    plan = plan_tiles(1024, 1024, TileConfig(overlap=16))
    assert plan.tile_hw == (218, 218) and plan.extra_pixel_ratio < 0.14
    # small images are not padded up to a whole tile; size multiple and engine minimum still hold
    assert plan_tiles(100, 77, TileConfig()).padded_hw == (100, 77)
    small = plan_tiles(10, 11, TileConfig(tile=64, overlap=8), TileLimits(min_hw=(32, 32), multiple=4))
    assert small.tile_hw == (32, 32) and small.padded_hw == (32, 32)


def test_limits_clamp_and_batch():
    lim = TileLimits(min_hw=(64, 64), max_hw=(128, 96), max_batch=2, multiple=4)
    plan = plan_tiles(300, 300, TileConfig(tile=256, overlap=16, batch=8, fit=False), lim)
    assert plan.tile_hw == (128, 96) and plan.batch == 2
    plan = plan_tiles(300, 300, TileConfig(tile=32, overlap=16, fit=False), lim)
    assert plan.tile_hw == (64, 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 16, "overlap": 16}, "overlap must be smaller"),
        ({"tile": 16, "overlap": 20}, "overlap must be smaller"),
        ({"tile": 16, "overlap": -1}, "overlap must be >= 0"),
        ({"tile": 0, "overlap": 0}, "tile must be a positive"),
        ({"tile": 16, "overlap": 4, "halo": 3}, "halo must be between 0 and overlap // 2 = 2"),
        ({"tile": 16, "overlap": 4, "halo": -1}, "halo must be between"),
        ({"tile": 16, "overlap": 4, "batch": 0}, "batch must be >= 1"),
        ({"tile": 16.0, "overlap": 4}, "tile must be an integer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TileConfig(**kwargs)


def test_plan_validation():
    with pytest.raises(ValueError, match="tile 30 must be a multiple of 4"):
        plan_tiles(50, 50, TileConfig(30, 8), TileLimits(multiple=4))
    with pytest.raises(ValueError, match="overlap 6 must be a multiple of 4"):
        plan_tiles(50, 50, TileConfig(32, 6), TileLimits(multiple=4))
    with pytest.raises(ValueError, match="leaves no room for overlap"):
        plan_tiles(50, 50, TileConfig(64, 16), TileLimits(max_hw=(16, 16)))
    with pytest.raises(ValueError, match="accepts no tile"):
        plan_tiles(50, 50, TileConfig(64, 16), TileLimits(min_hw=(64, 64), max_hw=(32, 32)))
    with pytest.raises(ValueError, match="at least 1x1"):
        plan_tiles(0, 5, TileConfig())
    with pytest.raises(ValueError, match="channel"):
        upscale_array(NearestBackend(channels=1), np.zeros((8, 8, 3), np.float32), TileConfig(8, 2))
    with pytest.raises(ValueError, match="float"):
        upscale_array(NearestBackend(), np.zeros((8, 8, 1), np.uint16), TileConfig(8, 2))
    with pytest.raises(ValueError, match="out has shape"):
        upscale_array(NearestBackend(), np.zeros((8, 8, 1), np.float32), TileConfig(8, 2), out=np.zeros((8, 8)))


def test_partial_batches_and_progress(rng):
    b = NearestBackend(scale=2)
    done: list[tuple[int, int]] = []
    img = rng.random((30, 50, 1), dtype=np.float32)
    cfg = TileConfig(tile=16, overlap=4, batch=3)
    plan = plan_tiles(30, 50, cfg)
    out = upscale_array(b, img, cfg, progress=lambda d, t: done.append((d, t)))
    assert done[-1] == (plan.num_tiles, plan.num_tiles) and plan.num_tiles == sum(b.calls) == 12
    assert [d for d, _ in done] == [0, *np.cumsum(b.calls)]  # one report per backend call
    assert b.calls == [3, 1] * 3  # 4 columns per strip -> batches of 3 and 1
    np.testing.assert_allclose(out, _whole(b, img), atol=1e-6)


def test_strips_in_order_each_row_once(rng):
    b = NearestBackend(scale=4)
    img = torch.from_numpy(rng.random((45, 30, 1), dtype=np.float32))
    spans = [(y0, y1, tuple(s.shape)) for y0, y1, s in iter_strips(b, img, TileConfig(16, 4, 1))]
    assert spans[0][0] == 0 and spans[-1][1] == 180
    assert all(p[1] == q[0] for p, q in zip(spans, spans[1:], strict=False))
    assert all(shape == (y1 - y0, 120, 1) for y0, y1, shape in spans)


def test_convert_and_2d_out(rng):
    img = rng.random((13, 17, 1), dtype=np.float32)
    out = np.zeros((52, 68), np.uint16)
    upscale_array(NearestBackend(), img, TileConfig(8, 2), out=out)
    ref = np.rint(_whole(NearestBackend(), img)[..., 0] * 65535)
    np.testing.assert_array_equal(out, ref.astype(np.uint16))
    out8 = np.zeros((52, 68, 1), np.uint8)
    upscale_array(NearestBackend(), img, TileConfig(8, 2), out=out8, convert=lambda s: (s * 100).astype(np.uint8))
    assert out8.max() <= 100 and out8.max() > 90


def _anon_rss() -> int:
    """Anonymous resident memory (bytes): heap of numpy *and* torch; excludes file-backed memmap pages."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError("RssAnon not available")


_MEM_SCRIPT = """
import gc, json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_tiling import NearestBackend, _anon_rss
from medsr.runtime import TileConfig, default_convert, upscale_array

h = w = 1500
img = np.full((h, w, 1), 0.5, np.float32)
out = np.lib.format.open_memmap(sys.argv[1], mode="w+", dtype=np.uint16, shape=(h * 4, w * 4))
to_u16 = default_convert(np.uint16)
gc.collect()
base = _anon_rss()
peak = 0

def sample(*_):
    global peak
    peak = max(peak, _anon_rss() - base)

def convert(strip):
    sample()
    return to_u16(strip)

upscale_array(NearestBackend(scale=4), img, TileConfig(tile=128, overlap=16, batch=4), out=out,
              convert=convert, progress=sample)
out.flush()
print(json.dumps({"peak": peak, "corners": [int(out[0, 0]), int(out[-1, -1]), int(out[3000, 1234])]}))
"""


def test_peak_memory_bounded_by_strip(tmp_path):
    """1500x1500 gray x4 into a uint16 memmap: the whole float32 output would be 144 MB.

    Method: RssAnon from /proc/self/status, sampled after every backend call and every strip, minus
    the value just before the call. RssAnon counts numpy and torch CPU heap (tracemalloc misses
    torch) but not the memmap's file pages, which are the output itself, not working memory. It runs
    in a fresh interpreter with MALLOC_MMAP_THRESHOLD_=131072: glibc's default *dynamic* threshold
    serves freed 10 MB strips from the brk heap, which then stays resident (fragmentation, ~2x the
    live size), and would measure the allocator rather than the runtime.
    """
    try:
        _anon_rss()
    except OSError:
        pytest.skip("needs Linux /proc/self/status")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    tests_dir = str(Path(__file__).parent)
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, str(tmp_path / "out.npy"), tests_dir],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    whole_float = 1500 * 4 * 1500 * 4 * 4
    # strip accumulator ~ 114*4 rows x 6000 x 4 B = 11 MB, plus the next strip's accumulator, the
    # conversion temporaries (float32 + uint16 strip), LR rows and a batch of tile outputs
    assert r["peak"] < 40e6, f"peak anon RSS delta {r['peak'] / 1e6:.1f} MB"
    assert r["peak"] < whole_float / 3
    assert r["corners"] == [32768, 32768, 32768]


class NaNBackend(NearestBackend):
    """Produces NaN for tiles whose LR origin column is 0 (flagged by the input value marker)."""

    def __init__(self, fallback: Backend | None = None, precision: str = "fp16"):
        super().__init__(scale=2)
        self._fb = fallback
        self.precision = precision

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        out = super().run(batch)
        bad = batch[:, 0, 0, 0] < 0.01  # tiles whose first pixel is dark "overflow"
        out = out.clone()
        out[bad] = float("nan")
        return out

    def fallback(self) -> Backend | None:
        return self._fb


def test_nan_tile_rerun_on_fallback(rng):
    img = rng.random((20, 40, 1), dtype=np.float32) * 0.9 + 0.05
    img[0, 0, 0] = 0.0  # only the first tile is bad
    fb = NearestBackend(scale=2)
    b = NaNBackend(fallback=fb)
    got = upscale_array(b, img, TileConfig(16, 4))
    assert fb.calls == [1]  # only the bad tile re-ran
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _whole(fb, img), atol=1e-6)


def test_nan_without_fallback_raises(rng):
    img = rng.random((20, 40, 1), dtype=np.float32) * 0.9 + 0.05
    img[0, 0, 0] = 0.0
    with pytest.raises(NonFiniteOutputError, match="NaN/Inf.*precision='fp32'"):
        upscale_array(NaNBackend(), img, TileConfig(16, 4))
    with pytest.raises(NonFiniteOutputError, match="full precision.*the weights are broken") as ei:
        upscale_array(NaNBackend(precision="fp32"), img, TileConfig(16, 4))
    assert "precision='fp32'" not in str(ei.value)  # no advice to run what already ran
    bad_fb = NaNBackend(precision="fp32")
    with pytest.raises(NonFiniteOutputError, match="even on the fallback"):
        upscale_array(NaNBackend(fallback=bad_fb), img, TileConfig(16, 4))


def test_nan_input_is_rejected():
    img = np.zeros((10, 10, 1), np.float32)
    img[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        upscale_array(NearestBackend(), img, TileConfig(8, 2))
