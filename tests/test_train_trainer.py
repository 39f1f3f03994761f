"""Trainer: loss goes down, exact resume, and the medsr-train CLI end to end (tiny models, CPU)."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medsr.train.config import ConfigError, load_config, set_value, shipped_configs, validate
from medsr.train.trainer import Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(folder, n: int = 3, size: int = 48, channels: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        x = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 1.5)
        x = (x - x.min()) / (x.max() - x.min()) * 0.6 + 0.2
        x = np.round(x * 255).astype(np.uint8)
        if channels == 3:
            x = np.stack([x, x[::-1], x.T], axis=-1)
        cv2.imwrite(str(folder / f"{i}.png"), x)
    return folder


def _cfg(tmp_path, data, **train) -> dict:
    cfg = load_config("cxr_x4")
    cfg["model"].update(num_block=1, num_feat=8, num_grow_ch=4, d_num_feat=8)
    cfg["data"].update(train_dir=str(data), gt_size=32, crop_pad_size=32, num_workers=0, multiscale=False)
    cfg["degradation"]["queue_size"] = 4
    cfg["train"].update(batch_size=2, out_dir=str(tmp_path / "run"), log_every=2, save_every=1000, val_every=1000)
    cfg["train"].update(train)
    validate(cfg)
    return cfg


def _quiet(msg: str) -> None:
    pass


def test_configs_ship_and_override() -> None:
    assert {"cxr_x4", "cxr_x4_fidelity", "retina_x2"} <= set(shipped_configs())
    c = load_config("cxr_x4")
    assert (c["train"]["total_iter"], c["train"]["batch_size"], c["data"]["gt_size"], c["model"]["scale"]) == (16600, 10, 256, 4)
    assert c["train"]["gan_weight"] == 0.1 and c["train"]["ema_decay"] == 0.999
    assert load_config("cxr_x4_fidelity")["train"]["gan_weight"] == 0.0
    r = load_config("retina_x2")
    assert (r["train"]["total_iter"], r["model"]["scale"]) == (3000, 2)
    set_value(c, "train.lr_g", "2e-4")
    set_value(c, "gan_weight", "0.05")
    set_value(c, "degradation.noise_range", "[1, 10]")
    assert c["train"]["lr_g"] == 2e-4 and c["train"]["gan_weight"] == 0.05 and c["degradation"]["noise_range"] == [1, 10]
    with pytest.raises(ConfigError):
        set_value(c, "train.nope", "1")


def test_missing_pretrained_fails_clearly(tmp_path) -> None:
    cfg = _cfg(tmp_path, _images(tmp_path / "d"))
    cfg["model"]["pretrained"] = str(tmp_path / "missing.pth")
    with pytest.raises(TrainingError, match="from-scratch"):
        Trainer(cfg, log=_quiet)


def test_l1_finetune_lowers_loss(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, _images(tmp_path / "d"), total_iter=20, gan_weight=0.0, perceptual_weight=0.0, lr_g=2e-3, l1_gt_usm=False)
    cfg["degradation"]["queue_size"] = 0
    tr = Trainer(cfg, log=_quiet, from_scratch=True)
    batch = next(tr._loader(0))
    lq, gt, _ = tr.prepare_batch(batch, 0)

    def l1() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.l1_loss(tr.net_g(lq), gt))

    before = l1()
    res = tr.fit(progress=False)
    after = l1()
    assert res.iterations == 20 and tr.net_d is None
    assert after < 0.5 * before, (before, after)
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    first, last = float(log[1].split(",")[1]), float(log[-1].split(",")[1])
    assert last < first


def test_resume_is_bit_exact(tmp_path) -> None:
    data = _images(tmp_path / "d")
    cfg = _cfg(tmp_path, data, total_iter=4, save_every=2, keep_checkpoints=5)
    full = Trainer(cfg, log=_quiet, from_scratch=True)
    full.fit(progress=False)
    ck = tmp_path / "run" / "checkpoints" / "iter_0000002.pt"
    assert ck.is_file()

    cfg2 = copy.deepcopy(cfg)
    cfg2["train"]["out_dir"] = str(tmp_path / "run2")
    resumed = Trainer(cfg2, log=_quiet, from_scratch=True)
    resumed.load_checkpoint(ck)
    assert resumed.iteration == 2
    resumed.fit(progress=False)
    assert resumed.net_d is not None and full.net_d is not None
    for a, b in ((full.net_g, resumed.net_g), (full.net_g_ema, resumed.net_g_ema), (full.net_d, resumed.net_d)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb), ka


def test_cli_end_to_end(tmp_path) -> None:
    from medsr.cli.train import main

    data = _images(tmp_path / "d", n=2, size=64)
    val = _images(tmp_path / "v", n=1, size=64)
    out = tmp_path / "out"
    args = ["--config", "cxr_x4", "--data", str(data), "--val", str(val), "--max-iters", "20", "--tiny",
            "--from-scratch", "--out", str(out), "--batch", "2", "--crop", "32", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "perceptual loss OFF" in res.output
    assert (out / "checkpoints" / "iter_0000020.pt").is_file()
    assert (out / "meta_info.txt").read_text().count("\n") >= 2
    weights = out / "cxr_x4.pth"
    assert weights.is_file()
    try:
        from medsr.weights import load_model
    except ImportError:  # pragma: no cover
        pytest.skip("medsr.weights is not importable yet")
    loaded = load_model(str(weights))
    assert loaded.descriptor.scale == 4 and loaded.descriptor.in_channels == 1
    assert loaded.descriptor.num_block == 1
    y = loaded.model(torch.rand(1, 1, 8, 8))
    assert y.shape == (1, 1, 32, 32)


def test_cli_without_pretrained_fails_clearly(tmp_path) -> None:
    from medsr.cli.train import main

    data = _images(tmp_path / "d", n=1)
    args = ["--config", "cxr_x4", "--data", str(data), "--tiny", "--max-iters", "1", "--out", str(tmp_path / "o"),
            "--pretrained", str(tmp_path / "nothing.pth")]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert "--from-scratch" in res.output


def test_cli_pretrained_gray_fold_vgg_d_and_l1_stage(tmp_path) -> None:
    """Pretrained RGB G folded to gray, official-format D, synthetic VGG19 file, L1 pre-training stage."""
    from medsr.arch import RRDBNet
    from medsr.cli.train import main
    from medsr.train.networks import UNetDiscriminatorSN

    try:
        from medsr.weights import save_weights
    except ImportError:  # pragma: no cover
        pytest.skip("medsr.weights is not importable yet")
    torch.manual_seed(0)
    g_path = tmp_path / "g.pth"
    save_weights(RRDBNet(3, 3, 4, 8, 1, 4), g_path, "tiny-rgb")
    d_path = tmp_path / "d.pth"
    torch.save({"params": UNetDiscriminatorSN(3, 8).state_dict()}, d_path)
    vgg = {}
    for idx, (cin, cout) in zip((0, 2, 5, 7), ((3, 64), (64, 64), (64, 128), (128, 128)), strict=True):
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3) * 0.05
        vgg[f"features.{idx}.bias"] = torch.zeros(cout)
    vgg_path = tmp_path / "vgg19.pth"
    torch.save(vgg, vgg_path)
    data = _images(tmp_path / "d", n=2, size=48)
    out = tmp_path / "out"
    args = ["--config", "cxr_x4", "--data", str(data), "--max-iters", "2", "--tiny", "--pretrained", str(g_path),
            "--vgg", str(vgg_path), "--set", f"model.pretrained_d={d_path}", "--set", "train.pretrain_l1_iters=2",
            "--set", "train.layer_weights={conv1_2 = 0.1, conv2_2 = 0.1}", "--out", str(out), "--crop", "32",
            "--batch", "2", "--no-progress", "--set", "train.log_every=1"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "folded to 1 channel" in res.output and "perceptual loss: VGG19" in res.output
    assert (out / "cxr_x4_psnr.pth").is_file() and (out / "cxr_x4.pth").is_file()
    rows = [r.split(",") for r in (out / "train_log.csv").read_text().splitlines()]
    header = rows[0]
    assert rows[1][header.index("l_percep")] == "" and rows[1][header.index("l_d_real")] == ""  # L1 stage
    assert float(rows[-1][header.index("l_percep")]) > 0 and float(rows[-1][header.index("l_d_real")]) > 0


def test_bicubic_skip_starts_at_bicubic_and_is_logged_and_saved(tmp_path) -> None:
    """model.skip = "bicubic": a from-scratch network's first validation is already at bicubic's level (the
    mean-colour plateau of a plain from-scratch RRDB is gone), the baseline row leads val_log.csv, and the
    saved weights load with the skip."""
    import csv

    data = _images(tmp_path / "d", n=3, size=64, channels=3)
    cfg = load_config("retina_x2_compact")
    cfg["model"].update(num_block=1, num_feat=8, num_grow_ch=4)
    cfg["data"].update(train_dir=str(data), gt_size=32, num_workers=0, multiscale=False, val_split=1, val_max_size=64,
                       min_foreground=0.0)
    cfg["train"].update(batch_size=2, out_dir=str(tmp_path / "run"), log_every=2, save_every=1000, val_every=4, total_iter=4)
    validate(cfg)
    res = Trainer(cfg, log=_quiet, from_scratch=True).fit(progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "val_log.csv").open()))
    assert rows[0]["iter"] == "bicubic" and rows[-1]["iter"] == "4"
    base, last = float(rows[0]["psnr"]), float(rows[-1]["psnr"])
    assert last > base - 1.0  # skip = "none" here: 7 dB against bicubic 56 dB after the same 4 iterations
    from medsr.weights import load_model

    assert load_model(str(res.weights)).model.skip == "bicubic"
    cfg2 = copy.deepcopy(cfg)
    cfg2["model"]["skip"] = "lanczos"
    with pytest.raises(ConfigError, match="skip"):
        validate(cfg2)


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_saves_the_best_validation_not_the_last(tmp_path, keep_best: bool) -> None:
    """train.keep_best (per-volume adaptation): a run that only makes the model worse (lr 5: diverges) saves the
    weights it started from, scored at iteration 0; without keep_best it saves the diverged ones."""
    data = _images(tmp_path / "d", n=3, size=64, channels=3)
    cfg = load_config("retina_x2_compact")
    cfg["model"].update(num_block=1, num_feat=8, num_grow_ch=4)
    cfg["data"].update(train_dir=str(data), gt_size=32, num_workers=0, multiscale=False, val_split=1, val_max_size=64,
                       min_foreground=0.0)
    cfg["train"].update(batch_size=2, out_dir=str(tmp_path / "run"), log_every=2, save_every=1000, val_every=2,
                        total_iter=4, lr_g=5.0, ema_decay=0.0, keep_best=keep_best)
    validate(cfg)
    torch.manual_seed(0)
    logs: list[str] = []
    tr = Trainer(cfg, log=logs.append, from_scratch=True)
    start = {k: v.clone() for k, v in tr.net_g_ema.state_dict().items()}
    res = tr.fit(progress=False)
    from medsr.weights import load_model

    saved = load_model(str(res.weights)).model.state_dict()
    same = all(torch.equal(saved[k].float(), start[k].float()) for k in start)
    assert same is keep_best
    assert any("keeping the best validation: iteration 0 of 4" in m for m in logs) is keep_best
