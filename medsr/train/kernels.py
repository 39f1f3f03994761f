"""Blur kernels of Real-ESRGAN's degradation model (a port of ``basicsr/data/degradations.py``).

All kernels are square ``float32`` numpy arrays of odd size that sum to 1. They are drawn on the CPU
(in the data-loader workers, as BasicSR does): they are tiny (at most 21x21) and drawing them is cheap.
Randomness comes only from the ``np.random.Generator`` passed in, so a seed fixes every kernel.

Kernel families: isotropic / anisotropic Gaussian, generalized Gaussian (``exp(-0.5 * d^beta)``),
plateau (``1 / (1 + d^beta)``) and the 2-D sinc (circular low-pass, ringing and overshoot artefacts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
# Real-ESRGAN: kernel sizes 7, 9, ..., 21, everything padded to 21.
KERNEL_RANGE = tuple(2 * v + 1 for v in range(3, 11))
MAX_KERNEL_SIZE = 21


def sigma_matrix2(sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    d = np.array([[sig_x**2, 0.0], [0.0, sig_y**2]])
    u = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return u @ d @ u.T


def mesh_grid(kernel_size: int) -> np.ndarray:
    ax = np.arange(-kernel_size // 2 + 1.0, kernel_size // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack((xx, yy), axis=-1)  # [k, k, 2]


def _quad_form(sigma: np.ndarray, grid: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(sigma)
    return np.sum((grid @ inv) * grid, axis=2)


def _normalise(k: np.ndarray) -> np.ndarray:
    return (k / np.sum(k)).astype(np.float32)


def bivariate_gaussian(kernel_size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    q = _quad_form(sigma_matrix2(sig_x, sig_y, theta), mesh_grid(kernel_size))
    return _normalise(np.exp(-0.5 * q))


def bivariate_generalized_gaussian(kernel_size: int, sig_x: float, sig_y: float, theta: float, beta: float) -> np.ndarray:
    q = _quad_form(sigma_matrix2(sig_x, sig_y, theta), mesh_grid(kernel_size))
    return _normalise(np.exp(-0.5 * np.power(q, beta)))


def bivariate_plateau(kernel_size: int, sig_x: float, sig_y: float, theta: float, beta: float) -> np.ndarray:
    q = _quad_form(sigma_matrix2(sig_x, sig_y, theta), mesh_grid(kernel_size))
    return _normalise(np.reciprocal(np.power(q, beta) + 1.0))


def _beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    # BasicSR: half of the draws below 1 (heavier tails), half above (flatter top)
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def random_mixed_kernel(
    rng: np.random.Generator,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    kernel_size: int,
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
    rotation_range: Sequence[float] = (-math.pi, math.pi),
) -> np.ndarray:
    """One kernel of a type drawn from ``kernel_list`` with probabilities ``kernel_prob``."""
    p = np.asarray(kernel_prob, dtype=np.float64)
    kind = kernel_list[int(rng.choice(len(kernel_list), p=p / p.sum()))]
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r} (known: {', '.join(KERNEL_TYPES)})")
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sig_x = float(rng.uniform(*sigma_range))
    if iso:
        sig_y, theta = sig_x, 0.0
    else:
        sig_y = float(rng.uniform(*sigma_range))
        theta = float(rng.uniform(*rotation_range))
    if kind in ("iso", "aniso"):
        return bivariate_gaussian(kernel_size, sig_x, sig_y, theta)
    if kind.startswith("generalized"):
        return bivariate_generalized_gaussian(kernel_size, sig_x, sig_y, theta, _beta(rng, betag_range))
    return bivariate_plateau(kernel_size, sig_x, sig_y, theta, _beta(rng, betap_range))


def circular_lowpass_kernel(cutoff: float, kernel_size: int, pad_to: int = 0) -> np.ndarray:
    """2-D sinc (Airy) kernel: ``cutoff * J1(cutoff * r) / (2 pi r)``, normalised to sum 1."""
    if kernel_size % 2 != 1:
        raise ValueError("kernel size must be odd")
    c = (kernel_size - 1) / 2
    y, x = np.mgrid[0:kernel_size, 0:kernel_size].astype(np.float64)
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2)
    r_safe = np.where(r == 0, 1.0, r)
    j1 = torch.special.bessel_j1(torch.from_numpy(cutoff * r_safe)).numpy()
    k = cutoff * j1 / (2 * np.pi * r_safe)
    k[int(c), int(c)] = cutoff**2 / (4 * np.pi)
    k = k / np.sum(k)
    if pad_to > kernel_size:
        p = (pad_to - kernel_size) // 2
        k = np.pad(k, ((p, p), (p, p)))
    return k.astype(np.float32)


def pad_kernel(k: np.ndarray, size: int = MAX_KERNEL_SIZE) -> np.ndarray:
    p = (size - k.shape[0]) // 2
    return np.pad(k, ((p, p), (p, p))) if p > 0 else k


def pulse_kernel(size: int = MAX_KERNEL_SIZE) -> np.ndarray:
    k = np.zeros((size, size), dtype=np.float32)
    k[size // 2, size // 2] = 1.0
    return k


def draw_blur_kernel(rng: np.random.Generator, opts: dict, second: bool = False) -> np.ndarray:
    """A first- or second-stage blur kernel as ``RealESRGANDataset.__getitem__`` draws it (padded to 21)."""
    sfx = "2" if second else ""
    kernel_size = int(rng.choice(KERNEL_RANGE))
    if rng.uniform() < opts[f"sinc_prob{sfx}"]:
        omega_c = rng.uniform(np.pi / 3, np.pi) if kernel_size < 13 else rng.uniform(np.pi / 5, np.pi)
        k = circular_lowpass_kernel(float(omega_c), kernel_size)
    else:
        k = random_mixed_kernel(
            rng,
            opts[f"kernel_list{sfx}"],
            opts[f"kernel_prob{sfx}"],
            kernel_size,
            opts[f"blur_sigma{sfx}"],
            opts[f"betag_range{sfx}"],
            opts[f"betap_range{sfx}"],
        )
    return pad_kernel(k)


def draw_final_sinc(rng: np.random.Generator, opts: dict) -> np.ndarray:
    """The final sinc filter (probability ``final_sinc_prob``), else a pulse (identity)."""
    if rng.uniform() < opts["final_sinc_prob"]:
        kernel_size = int(rng.choice(KERNEL_RANGE))
        omega_c = float(rng.uniform(np.pi / 3, np.pi))
        return circular_lowpass_kernel(omega_c, kernel_size, pad_to=MAX_KERNEL_SIZE)
    return pulse_kernel()
