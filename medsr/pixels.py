"""Pixel value conversions between stored integers and the float [0, 1] range the models see.

The one home for the rounding and clipping rule (used by io for files, by the runtime for strips, by the
API for numpy arrays): ``stored = clip(rint(x * peak) - offset, lo, hi)``; ``x = clip((v + offset) / peak, 0, 1)``.
"""

from __future__ import annotations

import numpy as np

#: full-scale value of the integer dtypes images come in
INT_PEAK: dict[np.dtype, int] = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


def to_unit(a: np.ndarray, peak: float, offset: float = 0.0) -> np.ndarray:
    """Stored values -> new float32 array ``(a + offset) / peak`` clipped to [0, 1]."""
    x = np.asarray(a).astype(np.float32)
    if offset:
        x += np.float32(offset)
    x *= np.float32(1.0 / peak)
    np.clip(x, 0.0, 1.0, out=x)
    return x


def from_unit(
    x: np.ndarray, dtype: np.dtype | type, peak: float, offset: float = 0.0,
    lo: float | None = None, hi: float | None = None,
) -> np.ndarray:
    """float [0, 1] -> ``dtype``: ``clip(rint(clip(x, 0, 1) * peak) - offset, lo, hi)`` (default lo/hi: the
    dtype's range for integers). Floats are returned clipped to [0, 1] as ``dtype``."""
    dt = np.dtype(dtype)
    y = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    if np.issubdtype(dt, np.floating):
        return y.astype(dt, copy=False)
    if not np.issubdtype(dt, np.integer):
        raise ValueError(f"no conversion from float to {dt}")
    y *= np.float32(peak)
    np.rint(y, out=y)
    if offset:
        y -= np.float32(offset)
    info = np.iinfo(dt)
    np.clip(y, info.min if lo is None else lo, info.max if hi is None else hi, out=y)
    return y.astype(dt)


def array_to_unit(arr: np.ndarray) -> np.ndarray:
    """uint8/uint16 (full range) or float in [0, 1] -> float32 in [0, 1]. ValueError (saying how to scale) for
    floats outside [0, 1], NaN/Inf, or other dtypes: nothing is silently clipped."""
    if arr.dtype in INT_PEAK:
        return to_unit(arr, INT_PEAK[arr.dtype])
    if np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ValueError("float image holds NaN or Inf values; give finite values in [0, 1]")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]: divide by the full scale "
                "(e.g. x / 255 or x / 65535), or pass the uint8/uint16 array itself"
            )
        return x
    raise ValueError(f"unsupported dtype {arr.dtype}: use uint8, uint16 or float in [0, 1]")


def unit_to_array(x: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Inverse of :func:`array_to_unit` for ``dtype`` (integers: full range; floats: float32)."""
    dt = np.dtype(dtype)
    if dt in INT_PEAK:
        return from_unit(x, dt, INT_PEAK[dt])
    if np.issubdtype(dt, np.floating):
        return from_unit(x, dt, 1.0)
    raise ValueError(f"no default conversion to {dt}: pass convert=")
