"""Data consistency along the low-resolution axis: the reconstruction, acquired again, gives the acquired slices.

The thick-slice acquisition is modelled as in training and evaluation (:mod:`medsr.volumes.training`): each
acquired slice ``i`` is the thin-slice signal along the LR axis weighted by a Gaussian slice profile of FWHM =
the slice gap (``fwhm`` in LR units, 1.0 by default), centred on the slice. On the output grid this is a linear
operator ``A`` (``n_in x n_out``, one row per acquired slice). The projection

    x' = x + A^T (A A^T)^-1 (y - A x)

is the closest volume to ``x`` (per line along the LR axis, least squares) whose re-acquisition ``A x'`` equals
the acquired slices ``y`` exactly. When the profile is right it never moves ``x`` away from the truth (the
truth is in the constraint set; an orthogonal projection onto it is non-expansive towards any of its points):
it removes only the part of the error that the acquisition can see, and adds nothing the acquisition does not
contain. It undoes the blur that cubic B-spline interpolation of blurred slices keeps, which is why the
through-plane model's input (contract v2) is the projected B-spline interpolation.

Boundaries follow the simulation's mirror rule (reflection about the first and last output slice centres).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
#: the Gaussian is cut at this many sigmas (scipy.ndimage.gaussian_filter1d's default truncate)
TRUNCATE = 4.0


def forward_matrix(positions: np.ndarray, n_in: int, fwhm: float = 1.0) -> np.ndarray:
    """The acquisition operator ``A`` (``n_in x len(positions)``): acquired slice ``i`` (LR coordinate ``i``)
    as the profile-weighted sum of the output slices at LR coordinates ``positions`` (uniformly spaced,
    increasing). ``fwhm``: the slice profile's FWHM in LR units (1.0 = slice thickness equals the gap)."""
    pos = np.asarray(positions, dtype=np.float64)
    n = pos.size
    if n < 2:
        raise ValueError("the output grid needs at least 2 slices")
    step = float(pos[1] - pos[0])
    if step <= 0 or not np.allclose(np.diff(pos), step, rtol=1e-6, atol=1e-9):
        raise ValueError("output positions must be uniformly spaced and increasing")
    sigma = fwhm * FWHM_TO_SIGMA / step  # in output voxels
    ext = np.arange(-(n - 1), 2 * (n - 1) + 1)
    fold = np.where(ext < 0, -ext, np.where(ext > n - 1, 2 * (n - 1) - ext, ext))
    ext_pos = pos[0] + ext * step
    a = np.zeros((n_in, n))
    for i in range(n_in):
        d = (ext_pos - i) / step
        w = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= TRUNCATE * sigma + 0.5)
        s = w.sum()
        if s <= 0:  # an acquired slice beyond the output grid's reach: nearest output slice
            w = np.zeros_like(w)
            w[int(np.argmin(np.abs(d)))] = 1.0
            s = 1.0
        np.add.at(a[i], fold, w / s)
    return a


class Projector:
    """The projection onto ``{x : A x = y}`` for one output grid, applied along an axis of a volume or the
    rows of an image; ``A`` from :func:`forward_matrix`."""

    def __init__(self, positions: np.ndarray, n_in: int, fwhm: float = 1.0) -> None:
        a = forward_matrix(positions, n_in, fwhm)
        gram = a @ a.T
        # A A^T is symmetric positive definite for any sane profile; lstsq-based pinv guards a degenerate one
        self.a = a.astype(np.float32)
        self.correction = (a.T @ np.linalg.pinv(gram, hermitian=True)).astype(np.float32)  # n_out x n_in

    def rows(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``x`` (n_out x W) projected so that its rows re-acquire ``y`` (n_in x W); float32."""
        x = np.asarray(x, dtype=np.float32)
        return x + self.correction @ (np.asarray(y, dtype=np.float32) - self.a @ x)

    def along(self, x: np.ndarray, y: np.ndarray, axis: int, *, lo: float | None = None, hi: float | None = None,
              y_offset: float = 0.0, y_scale: float = 1.0, chunk: int = 16) -> np.ndarray:
        """``x`` (3D, may be a memmap; modified in place) projected along ``axis`` onto the acquired
        ``(y - y_offset) / y_scale``, streamed in chunks of the first other axis; values clipped to ``[lo, hi]``
        when given."""
        other = [a for a in range(3) if a != axis][0]
        for i0 in range(0, x.shape[other], chunk):
            sl: list[Any] = [slice(None)] * 3
            sl[other] = slice(i0, min(i0 + chunk, x.shape[other]))
            xb = np.moveaxis(np.asarray(x[tuple(sl)], dtype=np.float32), axis, 0)
            yb = np.moveaxis((np.asarray(y[tuple(sl)], dtype=np.float32) - y_offset) / y_scale, axis, 0)
            shp = xb.shape
            res = self.rows(xb.reshape(shp[0], -1), yb.reshape(yb.shape[0], -1)).reshape(shp)
            if lo is not None or hi is not None:
                res = np.clip(res, lo, hi)
            x[tuple(sl)] = np.moveaxis(res, 0, axis)
        return x
