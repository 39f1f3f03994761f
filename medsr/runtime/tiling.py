"""Tiled runtime: fixed-size overlapping tiles, halo crop, raised-cosine feathering, strip streaming.

Geometry (one axis; the grid is the Cartesian product of the row and column axes):

* the LR image is reflect-padded at the bottom/right to a multiple of the backend's size multiple and
  to at least one tile; the output is cropped back to ``H*s x W*s``;
* tiles start at ``0, stride, 2*stride, ...`` (``stride = tile - overlap``) and the last tile is shifted
  inward to end exactly at the padded edge, so every tile has the same shape;
* between neighbours, ``halo`` pixels at each interior tile edge are dropped and the rest of the
  overlap is a blend zone where a raised-cosine ramp hands over from one tile to the next (the two
  ramps sum to one); tile edges on the image border get no ramp (weight 1);
* the blended sum is divided by the summed weights (float32).

Output is produced strip by strip (one strip per tile row), so memory is bounded by one strip of
tiles, not by the image. See docs/runtime.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from medsr.runtime.backend import Backend, BackendError, NonFiniteOutputError, TileLimits
from medsr.runtime.contract import DEFAULT_BATCH, DEFAULT_OVERLAP, DEFAULT_TILE, default_halo, default_overlap

log = logging.getLogger(__name__)

ImageLike = np.ndarray | torch.Tensor
#: ``progress(done, total)``: tiles finished so far and the image's tile count, after every backend call
Progress = Callable[[int, int], object]


@dataclass(frozen=True)
class TileConfig:
    """How to tile an LR image. All sizes are LR pixels.

    Defaults come from the engine contract (:mod:`medsr.runtime.contract`).
    ``tile``: tile edge including the overlap. ``overlap``: pixels shared by neighbouring tiles.
    ``halo``: pixels dropped at each interior tile edge before blending (None: the contract's
    ``default_halo(overlap)``); the remaining ``overlap - 2*halo`` is feathered.
    ``batch``: tiles per backend call (None: the backend's preferred batch).
    ``fit``: shrink the tile (per image, per axis) to the smallest size that covers the image with the
    same number of tiles, so a 1024-px axis takes 5 tiles of 218 instead of 5 of 256 (all tiles of an
    image still share one shape). ``fit=False`` keeps exactly ``tile`` and reflect-pads images smaller
    than a tile (for static-shape engines).
    """

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    halo: int | None = None
    batch: int | None = None
    fit: bool = True

    def __post_init__(self) -> None:
        for name in ("tile", "overlap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("halo", "batch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise ValueError(f"{name} must be an integer or None, got {v!r}")
        if self.tile < 1:
            raise ValueError(f"tile must be a positive number of LR pixels, got {self.tile}")
        if self.overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {self.overlap}")
        if self.overlap >= self.tile:
            raise ValueError(f"overlap must be smaller than the tile (0 <= overlap < {self.tile}), got {self.overlap}")
        if self.halo is not None and not 0 <= self.halo <= self.overlap // 2:
            raise ValueError(
                f"halo must be between 0 and overlap // 2 = {self.overlap // 2} "
                f"(two halos must fit in the overlap), got {self.halo}"
            )
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    #: smallest tile whose derived overlap (:func:`~medsr.runtime.contract.default_overlap`) still blends
    MIN_DERIVED_TILE = 8

    @classmethod
    def from_options(
        cls, tile: int | None = None, overlap: int | None = None, batch: int | None = None, *, fit: bool = True
    ) -> TileConfig:
        """The configuration from separately given values (CLI options, API keywords; None: the default),
        checked against each other in this one place; raises ValueError naming the conflict.

        An overlap that is not given is derived from the tile (``default_overlap``: 32, at most half
        the tile). A tile too small to keep any of it (under 8) is refused rather than silently run
        without overlap, which leaves a seam every few pixels: ask for ``overlap=0`` to mean that.
        """
        t = DEFAULT_TILE if tile is None else tile
        if overlap is None and isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            if 1 <= t < cls.MIN_DERIVED_TILE:
                raise ValueError(
                    f"tile {t} is smaller than the overlap (default {DEFAULT_OVERLAP} LR pixels, at most half the "
                    f"tile): a tile under {cls.MIN_DERIVED_TILE} leaves none, so tiles would meet in visible seams; "
                    f"use a tile of at least {cls.MIN_DERIVED_TILE}, or give the overlap explicitly (0: no blending)"
                )
            overlap = default_overlap(int(t))
        return cls(tile=t, overlap=DEFAULT_OVERLAP if overlap is None else overlap, batch=batch, fit=fit)

    @property
    def resolved_halo(self) -> int:
        return default_halo(self.overlap) if self.halo is None else int(self.halo)


@dataclass(frozen=True)
class _Axis:
    length: int  # padded LR length
    starts: tuple[int, ...]  # tile origins
    valid: tuple[tuple[int, int], ...]  # [a, b): LR pixels where the tile's weight is > 0
    zones: tuple[tuple[int, int], ...]  # [lo, hi): blend zone between tile k and k+1


def _plan_axis(length: int, tile: int, overlap: int, halo: int) -> _Axis:
    stride = tile - overlap
    if length <= tile:
        starts = [0]
    else:
        n = math.ceil((length - overlap) / stride)  # fewest stride-spaced tiles that cover
        starts = [i * stride for i in range(n - 1)] + [length - tile]  # last one shifted inward
    zones: list[tuple[int, int]] = []
    prev_hi = 0
    for k in range(len(starts) - 1):
        # the zone starts after the next tile's halo, never before the previous zone ended
        lo = max(starts[k + 1] + halo, prev_hi)
        hi = starts[k] + tile - halo
        zones.append((lo, hi))
        prev_hi = hi
    valid = []
    for k in range(len(starts)):
        a = zones[k - 1][0] if k > 0 else 0
        b = zones[k][1] if k < len(zones) else length
        valid.append((a, b))
    return _Axis(length, tuple(starts), tuple(valid), tuple(zones))


def _ramp_up(n: int) -> np.ndarray:
    t = (np.arange(n, dtype=np.float64) + 0.5) / max(n, 1)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def _axis_weights(ax: _Axis, scale: int) -> list[tuple[int, np.ndarray]]:
    """Per tile: (HR start, float32 weights over the tile's valid HR range)."""
    out = []
    for k, (a, b) in enumerate(ax.valid):
        w = np.ones((b - a) * scale, dtype=np.float64)
        if k > 0:
            lo, hi = ax.zones[k - 1]
            w[(lo - a) * scale : (hi - a) * scale] = _ramp_up((hi - lo) * scale)
        if k < len(ax.zones):
            lo, hi = ax.zones[k]
            w[(lo - a) * scale : (hi - a) * scale] = 1.0 - _ramp_up((hi - lo) * scale)
        out.append((a * scale, w.astype(np.float32)))
    return out


def _axis_weight_sum(ax: _Axis, scale: int) -> np.ndarray:
    total = np.zeros(ax.length * scale, dtype=np.float32)
    for a, w in _axis_weights(ax, scale):
        total[a : a + len(w)] += w
    return total


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go. ``tiles``: LR origins (y, x) in row-major order."""

    image_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    tile_hw: tuple[int, int]
    overlap: int
    halo: int
    batch: int
    y_axis: _Axis
    x_axis: _Axis

    @property
    def rows(self) -> list[list[tuple[int, int]]]:
        return [[(y, x) for x in self.x_axis.starts] for y in self.y_axis.starts]

    @property
    def tiles(self) -> list[tuple[int, int]]:
        return [t for row in self.rows for t in row]

    @property
    def num_tiles(self) -> int:
        return len(self.y_axis.starts) * len(self.x_axis.starts)

    @property
    def extra_pixel_ratio(self) -> float:
        """Computed LR pixels / image LR pixels - 1 (overlap and padding overhead)."""
        th, tw = self.tile_hw
        return self.num_tiles * th * tw / (self.image_hw[0] * self.image_hw[1]) - 1.0

    def axis_weights(self, axis: int, scale: int = 1) -> list[tuple[int, np.ndarray]]:
        """Blend weights of the tiles along ``axis`` (0: rows, 1: columns) at ``scale``:
        per tile, (start, float32 weights) over the range where the tile contributes.
        The 2-D weight of tile (i, j) is the outer product of row weight i and column weight j."""
        return _axis_weights(self.y_axis if axis == 0 else self.x_axis, scale)

    def weight_sum(self, axis: int, scale: int = 1) -> np.ndarray:
        """Summed 1-D weights over the padded axis (the 2-D sum is their outer product)."""
        return _axis_weight_sum(self.y_axis if axis == 0 else self.x_axis, scale)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _fit_tile(tile: int, overlap: int, limits: TileLimits) -> tuple[int, int]:
    m = limits.multiple
    if tile % m:
        raise ValueError(
            f"tile {tile} must be a multiple of {m} (the model's size multiple / the engine's), "
            f"e.g. {max(m, tile // m * m)} or {_round_up(tile, m)}"
        )
    if overlap % m:
        raise ValueError(
            f"overlap {overlap} must be a multiple of {m} so that every tile starts on the model's "
            f"pixel-unshuffle grid, e.g. {overlap // m * m} or {_round_up(overlap, m)}"
        )
    fitted = []
    for i, axis in enumerate(("height", "width")):
        lo = _round_up(max(1, limits.min_hw[i]), m)
        hi = None if limits.max_hw is None else limits.max_hw[i] // m * m
        if hi is not None and hi < lo:
            raise ValueError(f"the backend accepts no tile {axis} (limits {limits}); rebuild the engine profile")
        t = max(tile, lo)
        if hi is not None:
            t = min(t, hi)
        if t != tile:
            log.warning(
                "tile %s %d is outside the backend's accepted range [%d, %s]; using %d",
                axis, tile, lo, hi if hi is not None else "inf", t,
            )
        if t <= overlap:
            raise ValueError(
                f"the backend accepts tile {axis}s of at most {hi}, which leaves no room for overlap {overlap}; "
                "use a smaller overlap or an engine built for larger tiles"
            )
        fitted.append(t)
    if not limits.accepts(fitted[0], fitted[1]):  # pragma: no cover - defensive
        raise ValueError(f"no tile size accepted by the backend near {tile} (limits {limits})")
    return fitted[0], fitted[1]


def _shrink(length: int, tile: int, overlap: int, multiple: int, lowest: int) -> int:
    """Smallest tile (multiple of ``multiple``, >= ``lowest``) covering ``length`` with as many tiles as ``tile``."""
    if length <= tile:
        t = length
    else:
        n = math.ceil((length - overlap) / (tile - overlap))
        t = math.ceil((length - overlap) / n) + overlap
    t = max(_round_up(t, multiple), _round_up(max(1, lowest), multiple), overlap + multiple)
    return min(t, tile)


def plan_tiles(
    height: int, width: int, config: TileConfig, limits: TileLimits | None = None, preferred_batch: int = DEFAULT_BATCH
) -> TilePlan:
    """Plan the tiles of an ``height x width`` LR image (see :class:`TileConfig` for ``fit``).

    ``preferred_batch``: the batch when ``config.batch`` is None (the backend's ``preferred_batch``).
    ``limits`` (the backend's :class:`TileLimits`): tile and overlap must be multiples of
    ``limits.multiple`` (ValueError otherwise); a tile outside ``[min_hw, max_hw]`` is clamped to the
    nearest accepted size (a warning is logged), or ValueError when that leaves no room for the overlap.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {height}x{width}")
    limits = limits or TileLimits()
    th, tw = _fit_tile(config.tile, config.overlap, limits)
    batch = int(config.batch or preferred_batch)
    if limits.max_batch is not None:
        batch = max(1, min(batch, limits.max_batch))
    m = limits.multiple
    if config.fit:
        th = _shrink(_round_up(height, m), th, config.overlap, m, limits.min_hw[0])
        tw = _shrink(_round_up(width, m), tw, config.overlap, m, limits.min_hw[1])
    hp = max(_round_up(height, m), th)
    wp = max(_round_up(width, m), tw)
    halo = config.resolved_halo
    return TilePlan(
        image_hw=(height, width),
        padded_hw=(hp, wp),
        tile_hw=(th, tw),
        overlap=config.overlap,
        halo=halo,
        batch=batch,
        y_axis=_plan_axis(hp, th, config.overlap, halo),
        x_axis=_plan_axis(wp, tw, config.overlap, halo),
    )


# ---------------------------------------------------------------------------------------------------
# execution


def _reflect_index(n: int, idx: np.ndarray) -> np.ndarray:
    """Indices into a length-``n`` axis for positions ``idx`` with mirror (reflect) padding, any amount."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    i = np.mod(idx, period)
    return np.where(i < n, i, period - i)


def _as_hwc(image: ImageLike) -> ImageLike:
    if isinstance(image, torch.Tensor):
        if image.dim() == 2:
            image = image[:, :, None]
        if image.dim() != 3:
            raise ValueError(f"image must be H x W x C, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"image must be float in [0, 1], got {image.dtype}; scale it first")
        return image
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image must be H x W x C, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be float in [0, 1], got {image.dtype}; scale it first (e.g. / 65535)")
    return image


def _load_rows(image: ImageLike, rows: np.ndarray, cols: np.ndarray, device: torch.device) -> torch.Tensor:
    """LR rows (with reflect padding) as float32 [C, len(rows), len(cols)] on ``device``."""
    if isinstance(image, torch.Tensor):
        r = torch.from_numpy(rows).to(image.device)
        c = torch.from_numpy(cols).to(image.device)
        part = image.index_select(0, r).index_select(1, c)
        return part.to(device=device, dtype=torch.float32).permute(2, 0, 1).contiguous()
    part = np.take(np.take(image, rows, axis=0), cols, axis=1)  # reads only these rows of a memmap
    t = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
    return t.to(device).permute(2, 0, 1).contiguous()


class _Runner:
    """Runs batches and replaces tiles with non-finite output by the backend's fallback."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._fallback: Backend | None = None
        self._fallback_made = False

    def _get_fallback(self) -> Backend | None:
        if not self._fallback_made:
            self._fallback = self.backend.fallback()
            self._fallback_made = True
        return self._fallback

    def run(self, batch: torch.Tensor, origins: list[tuple[int, int]], expect: tuple[int, ...]) -> torch.Tensor:
        out = self.backend.run(batch)
        if tuple(out.shape) != expect:
            raise BackendError(
                f"backend {self.backend.name} returned shape {tuple(out.shape)} for input {tuple(batch.shape)}, "
                f"expected {expect} (scale {self.backend.scale})"
            )
        # one reduction per tile: NaN/Inf propagate into the sum (cheaper than a full isfinite mask)
        bad = ~torch.isfinite(out.reshape(out.shape[0], -1).sum(dim=1, dtype=torch.float32))
        if not bool(bad.any()):
            return out
        idx = bad.nonzero().flatten()
        where = ", ".join(f"(y={origins[i][0]}, x={origins[i][1]})" for i in idx.tolist()[:4])
        fb = self._get_fallback()
        if fb is None:
            if self.backend.precision in ("fp32", "tf32"):
                raise NonFiniteOutputError(
                    f"the model produced NaN/Inf in full precision ({self.backend.name}, {self.backend.precision}) "
                    f"for {len(idx)} tile(s) at LR origin {where}: the weights are broken (e.g. a diverged "
                    "training run or a damaged file); use other weights"
                )
            raise NonFiniteOutputError(
                f"backend {self.backend.name} ({self.backend.precision}) produced NaN/Inf for {len(idx)} tile(s) "
                f"at LR origin {where} and has no fp32 fallback (no fp32 model beside the engine); "
                "use an fp32 engine or precision='fp32'"
            )
        log.warning(
            "backend %s (%s) produced NaN/Inf for %d tile(s) at %s; re-running on %s (%s)",
            self.backend.name, self.backend.precision, len(idx), where, fb.name, fb.precision,
        )
        redo = fb.run(batch.index_select(0, idx).to(fb.device)).to(out.device, torch.float32)
        if not bool(torch.isfinite(redo).all()):
            raise NonFiniteOutputError(
                f"tile(s) at LR origin {where} are not finite even on the fallback backend {fb.name} "
                f"({fb.precision}); the model or its weights produce NaN/Inf for this input"
            )
        return out.index_put((idx,), redo)  # out-of-place: backend outputs may be inference tensors

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None


def iter_strips(
    backend: Backend,
    image: ImageLike,
    config: TileConfig,
    *,
    progress: Progress | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Upscale ``image`` (float H x W x C in [0, 1], numpy — memmap fine — or torch) strip by strip.

    Yields ``(y0, y1, strip)``: HR rows ``[y0, y1)`` as float32 ``[y1 - y0, W*s, C]`` on
    ``backend.device``, in order, each output row exactly once. ``progress(done, total)`` is called
    after every backend call with the tiles finished so far and the image's tile count (0 first).
    """
    img = _as_hwc(image)
    h, w, c = (int(v) for v in img.shape)
    if c != backend.channels:
        raise ValueError(f"image has {c} channel(s) but the backend takes {backend.channels}")
    s = backend.scale
    c_out = backend.descriptor.out_channels
    plan = plan_tiles(h, w, config, backend.tile_limits(), backend.preferred_batch)
    dev = backend.device
    th, tw = plan.tile_hw
    wp = plan.padded_hw[1]
    ya, xa = plan.y_axis, plan.x_axis
    as_t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
    wy = [as_t(v) for _, v in plan.axis_weights(0, s)]
    wx = [as_t(v) for _, v in plan.axis_weights(1, s)]
    sum_y = as_t(plan.weight_sum(0, s))
    sum_x = as_t(plan.weight_sum(1, s))
    cols = _reflect_index(w, np.arange(wp))
    runner = _Runner(backend)
    carry: torch.Tensor | None = None
    done_tiles = 0
    if progress is not None:
        progress(0, plan.num_tiles)
    try:
        for k, y0 in enumerate(ya.starts):
            a, b = ya.valid[k]
            strip = _load_rows(img, _reflect_index(h, np.arange(y0, y0 + th)), cols, dev)
            if not bool(torch.isfinite(strip.sum())):
                raise ValueError(f"input image contains NaN/Inf in LR rows {y0}..{min(y0 + th, h) - 1}")
            acc = torch.zeros((c_out, (b - a) * s, wp * s), dtype=torch.float32, device=dev)
            if carry is not None:
                acc[:, : carry.shape[1]] = carry
            ry = slice((a - y0) * s, (b - y0) * s)
            for j0 in range(0, len(xa.starts), plan.batch):
                js = range(j0, min(j0 + plan.batch, len(xa.starts)))
                inp = torch.stack([strip[:, :, xa.starts[j] : xa.starts[j] + tw] for j in js])
                origins = [(y0, xa.starts[j]) for j in js]
                out = runner.run(inp, origins, (len(js), c_out, th * s, tw * s))
                for i, j in enumerate(js):
                    xa0, xb0 = xa.valid[j]
                    x0 = xa.starts[j]
                    piece = out[i, :, ry, (xa0 - x0) * s : (xb0 - x0) * s]
                    acc[:, :, xa0 * s : xb0 * s].addcmul_(piece, wy[k][:, None] * wx[j][None, :])
                done_tiles += len(js)
                if progress is not None:
                    progress(done_tiles, plan.num_tiles)
            nxt = ya.valid[k + 1][0] if k + 1 < len(ya.starts) else b
            done = (nxt - a) * s
            carry = acc[:, done:].clone() if k + 1 < len(ya.starts) else None
            y0_hr, y1_hr = a * s, min(nxt * s, h * s)
            if y1_hr > y0_hr:
                res = acc[:, : y1_hr - y0_hr, : w * s]
                res.div_(sum_y[y0_hr:y1_hr, None]).div_(sum_x[None, : w * s])  # in place: no extra strip
                res = res.permute(1, 2, 0).contiguous()  # a view when C == 1 and W == padded W
                del acc
                yield y0_hr, y1_hr, res
                del res
            else:
                del acc
    finally:
        runner.close()


def default_convert(dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """float32 [0, 1] -> ``dtype``: floats as is (not clipped: backends already return [0, 1]), integers
    scaled to the full range and rounded (:func:`medsr.pixels.unit_to_array`)."""
    from medsr.pixels import unit_to_array

    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.floating):
        return lambda x: x.astype(dt, copy=False)
    unit_to_array(np.zeros(1, np.float32), dt)  # ValueError now for a dtype without a conversion
    return lambda x: unit_to_array(x, dt)


def upscale_array(
    backend: Backend,
    image: ImageLike,
    config: TileConfig | None = None,
    *,
    out: np.ndarray | None = None,
    convert: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Upscale a float H x W x C image in [0, 1] into ``out`` (allocated float32 H*s x W*s x C if None).

    ``out`` may be (H*s, W*s, C) or, for one channel, (H*s, W*s); any dtype (np.memmap too).
    ``convert`` maps each float32 strip (h, W*s, C) to the dtype of ``out`` (default: floats as
    is, integers scaled to their full range). Only one strip is in memory at a time.
    """
    config = config or TileConfig()
    img = _as_hwc(image)
    h, w = int(img.shape[0]), int(img.shape[1])
    s = backend.scale
    c_out = backend.descriptor.out_channels
    if out is None:
        out = np.empty((h * s, w * s, c_out), dtype=np.float32)
    ok = (h * s, w * s, c_out)
    if tuple(out.shape) != ok and not (c_out == 1 and tuple(out.shape) == ok[:2]):
        allowed = f"{ok}" + (f" or {ok[:2]}" if c_out == 1 else "")
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {allowed}")
    conv = convert or default_convert(out.dtype)
    for y0, y1, strip in iter_strips(backend, img, config, progress=progress):
        host = strip.cpu().numpy() if strip.device.type != "cpu" else strip.numpy()
        dst = out[y0:y1]
        dst[...] = np.asarray(conv(host)).reshape(dst.shape)
        del strip, host, dst  # free before the next strip is computed
    return out
