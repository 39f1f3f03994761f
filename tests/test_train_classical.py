"""The classical degradation (fidelity training): ranges, determinism, protocol coverage, dataset, config."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch

from medsr.eval.protocol import degrade
from medsr.train import data as D
from medsr.train.classical import classical_degrade, margin, validate_opts
from medsr.train.config import DEFAULTS, ConfigError, load_config, validate
from medsr.train.trainer import Trainer

OPTS = DEFAULTS["classical"]


def _gt(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 2.0)
    return ((x - x.min()) / (x.max() - x.min()) * 0.8 + 0.1)[:, :, None]


def test_shapes_range_quantised_and_deterministic() -> None:
    gt = _gt()
    a = classical_degrade(gt, 4, OPTS, np.random.default_rng([1, 2]))
    b = classical_degrade(gt, 4, OPTS, np.random.default_rng([1, 2]))
    c = classical_degrade(gt, 4, OPTS, np.random.default_rng([1, 3]))
    assert a.shape == (16, 16, 1) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.allclose(a * 255, np.round(a * 255), atol=1e-4)  # 8-bit levels


def test_pinned_options_reproduce_the_evaluation_protocol() -> None:
    gt = _gt(96)
    opts = copy.deepcopy(OPTS) | {"down": ["bicubic"], "down_prob": [1.0], "blur_prob": 1.0, "blur_sigma": [1.0, 1.0],
                                  "noise_prob": 0.0, "jpeg_prob": 0.0}
    lr = classical_degrade(gt, 4, opts, np.random.default_rng(0))
    ref = degrade(gt, 4, sigma=1.0, levels=255)
    assert np.abs(lr - ref).max() < 1.5 / 255


def test_blur_and_noise_do_what_they_say() -> None:
    gt = _gt(128)
    sharp = copy.deepcopy(OPTS) | {"down": ["area"], "down_prob": [1.0], "blur_prob": 0.0, "noise_prob": 0.0, "quantize": False}
    blurred = sharp | {"blur_prob": 1.0, "blur_sigma": [1.5, 1.5]}
    noisy = sharp | {"noise_prob": 1.0, "poisson_prob": 0.0, "noise_sigma": [5.0, 5.0]}
    a = classical_degrade(gt, 4, sharp, np.random.default_rng(0))
    b = classical_degrade(gt, 4, blurred, np.random.default_rng(0))
    n = classical_degrade(gt, 4, noisy, np.random.default_rng(0))
    assert np.abs(np.diff(b[..., 0], axis=1)).mean() < 0.8 * np.abs(np.diff(a[..., 0], axis=1)).mean()
    assert 3.0 / 255 < float((n - a).std()) < 7.0 / 255
    jpeg = sharp | {"jpeg_prob": 1.0, "jpeg_range": [20, 20]}
    j = classical_degrade(gt, 4, jpeg, np.random.default_rng(0))
    assert 0 < float(np.abs(j - a).max()) < 0.2


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("down", ["nearest"], "classical.down"), ("down_prob", [1.0], "down_prob"), ("blur_sigma", [2.0, 1.0], "blur_sigma"),
     ("noise_prob", 1.5, "noise_prob"), ("jpeg_range", [0, 120], "jpeg_range")],
)
def test_bad_options_are_named(key: str, value: object, match: str) -> None:
    opts = copy.deepcopy(OPTS) | {key: value}
    if key == "jpeg_range":
        opts["jpeg_prob"] = 0.5
    with pytest.raises(ValueError, match=match):
        validate_opts(opts)
    cfg = load_config("cxr_x4_compact")
    cfg["classical"][key] = value
    if key == "jpeg_range":
        cfg["classical"]["jpeg_prob"] = 0.5
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_dataset_pairs_align_and_resume_exactly(tmp_path) -> None:
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.round(_gt(160, i)[:, :, 0] * 255).astype(np.uint8))
    cfg = load_config("cxr_x4_compact")
    paths = D.list_images(tmp_path)
    ds = D.ClassicalDataset(paths, 4, 1, cfg["data"] | {"gt_size": 32}, cfg["classical"], seed=3)
    s = ds[(1, 7, 0)]
    assert s["gt"].shape == (1, 32, 32) and s["lq"].shape == (1, 8, 8)
    # the LR is a degraded view of exactly this GT crop: close to its area downscale
    down = cv2.resize(s["gt"][0].numpy(), (8, 8), interpolation=cv2.INTER_AREA)
    assert float(np.abs(down - s["lq"][0].numpy()).mean()) < 0.05
    fresh = D.ClassicalDataset(paths, 4, 1, cfg["data"] | {"gt_size": 32}, cfg["classical"], seed=3)
    t = fresh[(1, 7, 0)]
    assert torch.equal(s["gt"], t["gt"]) and torch.equal(s["lq"], t["lq"])
    assert margin(cfg["classical"]) >= 3 * max(cfg["classical"]["blur_sigma"])


def test_holdout_split_is_seeded_and_disjoint(tmp_path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(20)]
    tr, ho = D.split_holdout(paths, 4, seed=0)
    assert len(ho) == 4 and len(tr) == 16 and not set(tr) & set(ho)
    assert D.split_holdout(paths, 4, seed=0) == (tr, ho) and D.split_holdout(paths, 4, seed=1)[1] != ho
    with pytest.raises(ValueError, match="leaves no training images"):
        D.split_holdout(paths[:3], 3, seed=0)


def test_compact_fidelity_training_end_to_end(tmp_path, one_thread) -> None:
    data = tmp_path / "d"
    data.mkdir()
    for i in range(5):
        cv2.imwrite(str(data / f"{i}.png"), np.round(_gt(96, i)[:, :, 0] * 255).astype(np.uint8))
    cfg = load_config("cxr_x4_compact")
    cfg["model"].update(num_block=1, num_feat=8, num_grow_ch=4)
    cfg["data"].update(train_dir=str(data), gt_size=32, multiscale=False, val_split=1, val_max_size=64)
    cfg["train"].update(total_iter=12, batch_size=2, out_dir=str(tmp_path / "run"), val_every=6, save_every=6, log_every=3)
    validate(cfg)
    tr = Trainer(cfg, log=lambda m: None, from_scratch=True)
    assert tr.net_d is None and not tr.need_usm and len(tr.val) == 1
    assert (tmp_path / "run" / "val_holdout.txt").read_text().strip() not in (tmp_path / "run" / "meta_info.txt").read_text()
    assert tr.lr_at(0, 4e-4) == pytest.approx(4e-4) and tr.lr_at(11, 4e-4) == pytest.approx(1e-6)
    res = tr.fit(progress=False)
    assert res.iterations == 12 and res.weights.is_file() and {"psnr", "ssim"} <= set(res.val)


def test_ema_warmup_tracks_a_from_scratch_model(tmp_path, one_thread) -> None:
    data = tmp_path / "d"
    data.mkdir()
    cv2.imwrite(str(data / "0.png"), np.round(_gt(96)[:, :, 0] * 255).astype(np.uint8))
    cfg = load_config("cxr_x4_compact")
    cfg["model"].update(num_block=1, num_feat=8, num_grow_ch=4)
    cfg["data"].update(train_dir=str(data), gt_size=32, multiscale=False, val_split=0)
    cfg["train"].update(total_iter=20, batch_size=2, out_dir=str(tmp_path / "run"), lr_g=2e-3)
    for warm in (True, False):
        cfg["train"]["ema_warmup"] = warm
        tr = Trainer(cfg, log=lambda m: None, from_scratch=True)
        init = [p.clone() for p in tr.net_g_ema.parameters()]
        tr.fit(progress=False)
        moved = sum(float((p - q).abs().sum()) for p, q in zip(tr.net_g_ema.parameters(), init, strict=True))
        dist = sum(float((p - q.detach()).abs().sum()) for p, q in zip(tr.net_g_ema.parameters(), tr.net_g.parameters(), strict=True))
        if warm:
            warm_dist = dist
        else:
            assert warm_dist < 0.2 * dist and moved > 0
