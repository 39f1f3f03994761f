"""medsr.eval: metrics, degradation, the protocol with plain callables, reports, the medsr-eval CLI."""

from __future__ import annotations

import csv
import math
import struct

import cv2
import numpy as np
import pytest

from medsr.eval.baselines import BASELINES, imresize, make_baseline, upscale_baseline
from medsr.eval.metrics import psnr, ssim
from medsr.eval.protocol import (
    ProtocolConfig,
    degrade,
    evaluate,
    gaussian_kernel_size,
    prepare_gt,
)
from medsr.eval.report import markdown_table, save_figure, summarize, write_csv, write_reports


def smooth_image(rng: np.random.Generator, h: int = 64, w: int = 64, c: int = 1) -> np.ndarray:
    """Smooth random texture in [0.1, 0.9] (upsampled noise), float32 H x W x C."""
    small = rng.random((h // 8, w // 8, c)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, c)
    return (0.1 + 0.8 * np.clip(img, 0, 1)).astype(np.float32)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


# --- metrics ----------------------------------------------------------------------------------------


def test_identical_images_score_inf_and_one(rng):
    img = smooth_image(rng, c=3)
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-9)
    assert ssim(img[..., :1], img[..., :1], crop=4) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("sigma", [0.01, 0.05])
def test_psnr_of_known_gaussian_noise(rng, sigma):
    img = np.full((128, 128), 0.5, dtype=np.float64)
    noisy = img + rng.normal(0, sigma, img.shape)
    assert psnr(noisy, img) == pytest.approx(20 * math.log10(1 / sigma), abs=0.1)


def test_psnr_y_channel_of_gray_rgb_matches_scaled_gray(rng):
    g = smooth_image(rng)[..., 0]
    n = np.clip(g + rng.normal(0, 0.02, g.shape), 0, 1).astype(np.float32)
    rgb_g, rgb_n = np.repeat(g[..., None], 3, 2), np.repeat(n[..., None], 3, 2)
    # Y = 16/255 + (219/255) * gray: PSNR shifts by 20*log10(255/219)
    assert psnr(rgb_n, rgb_g) == pytest.approx(psnr(n, g) + 20 * math.log10(255 / 219), abs=1e-6)


def test_ssim_hand_computed_constant_images():
    # constant images: sigma terms vanish, SSIM = (2*m1*m2 + C1) / (m1^2 + m2^2 + C1) in 0..255 units
    a, b = np.full((16, 16), 0.4), np.full((16, 16), 0.6)
    m1, m2, c1 = 0.4 * 255, 0.6 * 255, (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), rel=1e-9)


def test_ssim_matches_naive_valid_window_reference(rng):
    # independent reference: explicit 11x11 Gaussian (sigma 1.5) windows at every valid position
    a = rng.random((24, 26))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    wa = np.lib.stride_tricks.sliding_window_view(a * 255, (11, 11))
    wb = np.lib.stride_tricks.sliding_window_view(b * 255, (11, 11))

    def wmean(t):
        return (t * win).sum(axis=(-1, -2))

    mu1, mu2 = wmean(wa), wmean(wb)
    v1, v2 = wmean(wa * wa) - mu1**2, wmean(wb * wb) - mu2**2
    cov = wmean(wa * wb) - mu1 * mu2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ref = (((2 * mu1 * mu2 + c1) * (2 * cov + c2)) / ((mu1**2 + mu2**2 + c1) * (v1 + v2 + c2))).mean()
    assert ssim(a, b) == pytest.approx(ref, abs=1e-6)


def test_ssim_matches_skimage_when_installed(rng):
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (a dev dependency) is not installed")
    a = smooth_image(rng, 48, 48)[..., 0].astype(np.float64)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ref = metrics.structural_similarity(a * 255, b * 255, data_range=255, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
    assert ssim(a, b) == pytest.approx(ref, abs=5e-3)


def test_ssim_decreases_with_noise(rng):
    a = smooth_image(rng, 48, 48)
    s1 = ssim(np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1), a)
    s2 = ssim(np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1), a)
    assert 1.0 > s1 > s2 > 0.0


# --- degradation --------------------------------------------------------------------------------------


def test_imresize_matches_matlab_properties():
    const = np.full((40, 40, 1), 0.3, np.float32)
    np.testing.assert_allclose(imresize(const, (10, 10)), 0.3, atol=1e-6)  # rows of weights sum to 1
    ramp = np.tile(np.arange(32, dtype=np.float32), (8, 1))
    down = imresize(ramp, (8, 16))
    # a linear ramp stays linear away from the borders: pixel centres 2i+0.5 (0-based)
    np.testing.assert_allclose(down[:, 2:-2], np.tile(np.arange(2, 14) * 2 + 0.5, (8, 1)), atol=1e-5)


def test_degrade_shape_determinism_and_blur(rng):
    gt = prepare_gt(smooth_image(rng, 66, 70, 3), 4)
    assert gt.shape == (64, 68, 3)  # cropped to a multiple of the scale
    lr1 = degrade(gt, 4, sigma=1.0)
    lr2 = degrade(gt, 4, sigma=1.0)
    assert lr1.shape == (16, 17, 3) and lr1.dtype == np.float32
    np.testing.assert_array_equal(lr1, lr2)
    sharp = degrade(gt, 4, sigma=0)
    assert np.var(lr1) < np.var(sharp)  # blur removes variance
    assert degrade(gt, 4, 1.0, levels=255).max() * 255 % 1 == pytest.approx(0, abs=1e-4)
    assert gaussian_kernel_size(1.0) == 7 and gaussian_kernel_size(0.5) == 5
    with pytest.raises(ValueError, match="multiple"):
        degrade(np.zeros((10, 10, 1), np.float32), 4)


def test_prepare_gt_resize_and_gray_layout(rng):
    assert prepare_gt(smooth_image(rng, 64, 48)[..., 0], 2, size=40).shape == (40, 40, 1)


def test_baselines_shape_and_clip(rng):
    lr = smooth_image(rng, 16, 16, 1)
    for name in BASELINES:
        out = upscale_baseline(lr * 1.5 - 0.2, name, (64, 64))
        assert out.shape == (64, 64, 1) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError):
        make_baseline("sinc", 4)


# --- protocol -----------------------------------------------------------------------------------------


def _images(rng, n=2, c=1, hw=(64, 64)):
    return [(f"img{i}.png", smooth_image(rng, hw[0], hw[1], c), 255) for i in range(n)]


def test_bicubic_as_model_equals_bicubic_row_and_oracle_is_perfect(rng):
    images = _images(rng, 2, c=1)
    gts = {name: prepare_gt(np.round(gt * 255) / 255, 4) for name, gt, _ in images}
    bicubic_model = make_baseline("bicubic", 4)
    current: dict[str, str] = {}

    def oracle(lr):
        return gts[current["name"]]

    def tracked():
        for name, gt, lv in images:
            current["name"] = name
            yield name, gt, lv

    res = evaluate(tracked(), {"bicubic-model": bicubic_model, "oracle": oracle}, ProtocolConfig(scale=4, lpips=False))
    by = {(r["image"], r["method"]): r for r in res.records}
    for name, _, _ in images:
        assert by[(name, "bicubic-model")]["psnr"] == by[(name, "bicubic")]["psnr"]
        assert by[(name, "bicubic-model")]["ssim"] == by[(name, "bicubic")]["ssim"]
        assert by[(name, "oracle")]["psnr"] == math.inf
        assert by[(name, "oracle")]["ssim"] == pytest.approx(1.0)
        assert math.isnan(by[(name, "oracle")]["lpips"])
    assert res.methods[:4] == ["nearest", "bilinear", "bicubic", "lanczos"]
    rows = {r["method"]: r for r in summarize(res)}
    assert rows["bicubic-model"]["d_psnr_vs_bicubic"] == 0.0
    assert rows["bicubic"]["d_ssim_vs_bicubic"] == 0.0
    assert rows["oracle"]["psnr"] == math.inf and rows["oracle"]["d_psnr_vs_bicubic"] == math.inf
    assert rows["bicubic"]["psnr"] > rows["nearest"]["psnr"]  # smooth images: bicubic beats nearest
    table = markdown_table(res)
    assert "| oracle | 2 | inf | 1.0000" in table and "+inf" in table
    assert "**bicubic**" in table and table.count("\n") == 2 + len(res.methods)


def test_bicubic_always_present_and_rgb_y_channel(rng):
    cfg = ProtocolConfig(scale=2, sigma=0.5, baselines=("nearest",), lpips=False)
    res = evaluate(_images(rng, 1, c=3, hw=(48, 40)), {"m": make_baseline("lanczos", 2)}, cfg)
    assert res.methods == ["nearest", "bicubic", "m"]
    r = res.records[0]
    assert (r["height"], r["width"], r["channels"]) == (48, 40, 3)
    assert res.sample is not None and res.sample.lr.shape == (24, 20, 3)


def test_model_output_layouts_are_adapted(rng):
    # a model that returns H x W (2-D) uint8 for a gray image, and a wrong-scale model
    def uint8_2d(lr):
        up = make_baseline("bicubic", 2)(lr)
        return np.round(up[..., 0] * 255).astype(np.uint8)

    res = evaluate(_images(rng, 1), {"u8": uint8_2d}, ProtocolConfig(scale=2, lpips=False))
    rows = {r["method"]: r for r in summarize(res)}
    assert abs(rows["u8"]["d_psnr_vs_bicubic"]) < 1e-6
    with pytest.raises(ValueError, match="scale"):
        evaluate(_images(rng, 1), {"x4": make_baseline("bicubic", 4)}, ProtocolConfig(scale=2, lpips=False))


def test_reports_written(rng, tmp_path):
    res = evaluate(_images(rng, 2, c=1, hw=(96, 96)), {"lanczos-model": make_baseline("lanczos", 4)},
                   ProtocolConfig(scale=4, lpips=False))
    paths = write_reports(res, tmp_path / "out")
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5 and {"psnr", "ssim", "lpips", "d_psnr_vs_bicubic"} <= set(rows[0])
    assert rows[0]["lpips"] == "n/a"
    md = paths["summary"].read_text()
    assert "ΔPSNR vs bicubic" in md and "lanczos-model" in md and "sigma=1" in md
    w, h = png_size(paths["figure"])
    assert w > 0 and h > 0
    w2, _ = png_size(save_figure(res.sample, tmp_path / "f2.png", 4, methods=["bicubic"]))
    assert w2 < w  # fewer panels, narrower figure
    write_csv(res.records, tmp_path / "plain.csv")


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_on_synthetic_folder_with_tiny_weights(rng, tmp_path):
    pytest.importorskip("medsr.api")
    torch = pytest.importorskip("torch")
    try:  # the Upscaler's dependencies are written by other modules
        from medsr.runtime import TorchBackend, upscale_array  # noqa: F401
        from medsr.weights import load_model  # noqa: F401
    except ImportError as e:
        pytest.skip(f"medsr.runtime / medsr.weights not available yet: {e}")
    from click.testing import CliRunner
    from conftest import tiny_rrdb

    from medsr.cli.eval import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        cv2.imwrite(str(data / f"g{i}.png"), np.round(smooth_image(rng, 64, 64)[..., 0] * 255).astype(np.uint8))
    cv2.imwrite(str(data / "c.png"), np.round(smooth_image(rng, 64, 60, 3) * 255).astype(np.uint8))
    weights = tmp_path / "tiny_x4.pth"
    torch.save({"params_ema": tiny_rrdb(scale=4).state_dict()}, weights)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, [str(data), "--scale", "4", "--model", str(weights), "--limit", "2", "--sigma", "0.8",
               "--device", "cpu", "--tile", "32", "--out", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| **bicubic** |" in result.output and "tiny_x4" in result.output
    assert {p.name for p in out.iterdir()} == {"results.csv", "summary.md", "figure.png"}
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len({r["image"] for r in rows}) == 2 and len(rows) == 2 * 5
    bad = CliRunner().invoke(main, [str(data), "--scale", "2", "--model", str(weights), "--out", str(out)])
    assert bad.exit_code == 2 and "x4" in bad.output
