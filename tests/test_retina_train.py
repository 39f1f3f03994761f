"""The retina recipe (issue 21): config, multi-scale GT with the protocol scale, black-surround crops,
validation on the protocol's 512 px ground truth. Synthetic images only."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from retina_helpers import OP_8BIT, fundus, write_rgb  # noqa: E402,F401

# ------------------------------------------------------------------------------------ training data


def test_retina_config_is_the_recipe_the_issue_asks_for() -> None:
    from medsr.train.config import load_config, validate

    cfg = load_config("retina_x2_compact")
    validate(cfg)
    m, d, t, c = cfg["model"], cfg["data"], cfg["train"], cfg["classical"]
    assert (m["scale"], m["channels"], m["pretrained"]) == (2, 3, "")
    assert d["mode"] == "classical" and d["multiscale"] and 512 in d["multiscale_sizes"]
    assert d["val_split"] > 0 and d["val_degradation"] == "protocol" and d["val_resize"] == 512
    assert 0 < d["min_foreground"] < 1
    assert t["perceptual_weight"] == 0 and t["gan_weight"] == 0 and t["ema_warmup"]
    lo, hi = c["blur_sigma"]
    assert lo <= 0.5 and hi >= 1.5 and "bicubic" in c["down"]
    assert 0 < c["jpeg_prob"] <= 0.3


def test_multiscale_writes_the_square_protocol_scale_only_as_a_downscale(tmp_path: Path) -> None:
    from medsr.train.data import generate_multiscale

    src = write_rgb(tmp_path / "f.png", fundus(96, 112))
    small = write_rgb(tmp_path / "g.png", fundus(40, 48))
    out = generate_multiscale([src, small], tmp_path / "ms", extra_sizes=[64, 256])
    names = sorted(p.name for p in out[2:])
    assert "00000_fS64.png" in names and not any("S256" in n for n in names)  # 256 would upscale
    assert not any(n.startswith("00001_gS64") for n in names)  # 64 > 40: no upscale
    s64 = cv2.imread(str(tmp_path / "ms" / "00000_fS64.png"), cv2.IMREAD_UNCHANGED)
    assert s64.shape == (64, 64, 3) and s64.dtype == np.uint8


def test_min_foreground_keeps_crops_off_the_black_surround() -> None:
    from medsr.train.data import ClassicalDataset, foreground_fraction

    yy, xx = np.mgrid[0:400, 0:400]
    img = np.zeros((400, 400, 3), np.float32)
    img[(yy - 200) ** 2 + (xx - 200) ** 2 < 150**2] = 0.6  # a fundus-like field: 44 % of the image

    class OneImage(ClassicalDataset):
        def _image(self, idx: int) -> np.ndarray:
            return np.round(img * 255).astype(np.uint8)

    opts = {"down": ["bicubic"], "down_prob": [1.0], "blur_prob": 0.0, "blur_sigma": [0.0, 0.0], "noise_prob": 0.0,
            "poisson_prob": 0.0, "noise_sigma": [0, 0], "poisson_scale": [0, 0], "jpeg_prob": 0.0,
            "jpeg_range": [90, 95], "quantize": True}

    def fg(min_fg: float) -> list[float]:
        d = {"gt_size": 32, "use_hflip": False, "use_rot": False, "min_foreground": min_fg}
        ds = OneImage([Path("x.png")], 2, 3, d, opts, seed=0)
        return [foreground_fraction(ds[(0, it, 0)]["gt"].numpy().transpose(1, 2, 0)) for it in range(40)]

    off, on = fg(0.0), fg(0.5)
    assert sum(f < 0.5 for f in off) >= 15  # without the rule many crops are mostly black
    assert sum(f < 0.5 for f in on) <= 3  # with it (nearly) every crop shows the field


def test_validation_resize_makes_the_protocol_ground_truth(tmp_path: Path) -> None:
    from medsr.train.data import load_validation

    p = write_rgb(tmp_path / "v.png", fundus(120, 150))
    [(name, lr, hr)] = load_validation([p], 2, 3, 4, 512, "protocol", resize=64)
    assert name == "v" and hr.shape == (64, 64, 3) and lr.shape == (32, 32, 3)
    np.testing.assert_allclose(hr * 255, np.round(hr * 255), atol=1e-3)  # 8-bit GT, as the protocol's
