"""Synthetic fundus images for the retina tests (no ../shared data)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def fundus(h: int = 96, w: int = 112, seed: int = 0) -> np.ndarray:
    """A synthetic colour fundus: orange disc of retina in a black surround, dark thin 'vessels'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx, r = h / 2, w / 2, 0.45 * min(h, w)
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    img = np.zeros((h, w, 3), np.float32)
    base = np.array([0.75, 0.40, 0.18], np.float32)
    img[inside] = base + 0.03 * rng.standard_normal((int(inside.sum()), 3)).astype(np.float32)
    for k in range(5):  # vessels: dark lines of 1-3 px
        a = rng.uniform(0, np.pi)
        d = np.abs((yy - cy) * np.cos(a) - (xx - cx) * np.sin(a) - rng.uniform(-r / 2, r / 2))
        line = (d < 0.5 + k % 3) & inside
        img[line] *= 0.55
    return np.clip(cv2.GaussianBlur(img, (0, 0), 0.7), 0, 1)


def write_rgb(path: Path, img: np.ndarray) -> Path:
    cv2.imwrite(str(path), np.round(img[..., ::-1] * 255).astype(np.uint8))
    return path


