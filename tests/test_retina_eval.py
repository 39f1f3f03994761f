"""The retina evaluation protocol (issue 21): 512 px antialiased Lanczos GT, x2, RGB metrics, vessel PSNR,
vessel figure, the x4plus comparator at x2 output or a clear "not available" row. Synthetic images only."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from retina_helpers import OP_8BIT, fundus, write_rgb  # noqa: E402,F401

# ------------------------------------------------------------------------------------ evaluation


def test_lanczos_resize_is_antialiased_and_matches_pil() -> None:
    from medsr.eval.baselines import lanczos_resize

    stripes = np.tile(np.array([0.0, 1.0], np.float32), 64)[None, :].repeat(32, 0)  # 1-px stripes
    small = lanczos_resize(stripes, (8, 16))
    assert abs(float(small[2:-2, 2:-2].mean()) - 0.5) < 0.02 and float(small[2:-2, 2:-2].std()) < 0.02
    Image = pytest.importorskip("PIL.Image")
    x = np.round(fundus(90, 120, seed=3) * 255).astype(np.uint8)
    ours = lanczos_resize(x.astype(np.float64), (45, 50))
    pil = np.asarray(Image.fromarray(x).resize((50, 45), Image.LANCZOS), dtype=np.float64)
    assert float(np.abs(ours - pil)[3:-3, 3:-3].mean()) < 1.0


def test_vessel_mask_finds_thin_dark_lines_not_the_surround() -> None:
    from medsr.eval.vessels import field_of_view, masked_psnr, vessel_mask

    img = np.full((128, 128, 3), 0.6, np.float32)
    img[:, :10] = 0.0  # black surround on the left
    img[60:62, 20:120, 1] = 0.3  # a 2-px dark vessel in the green channel
    m = vessel_mask(img, fraction=0.05)
    assert m[60:62, 30:110].mean() > 0.9
    assert not m[:, :10].any() and not field_of_view(img)[:, :10].any()
    assert m.sum() < 0.1 * m.size
    blurred = img.copy()
    blurred[58:64, 20:120] = cv2.GaussianBlur(img, (0, 0), 2.0)[58:64, 20:120]
    # the blur damages only the vessel: it costs far more PSNR inside the mask than over the image
    from medsr.eval.metrics import psnr

    assert masked_psnr(blurred, img, m) < psnr(blurred, img, y_channel=False) - 6


def _fundus_folder(tmp_path: Path, n: int = 2) -> Path:
    d = tmp_path / "fundus"
    d.mkdir()
    for i in range(n):
        write_rgb(d / f"f{i}.png", fundus(600, 700, seed=i))
    return d


def test_retina_protocol_scores_rgb_on_512_lanczos_ground_truth(tmp_path: Path) -> None:
    from medsr.eval.metrics import psnr, ssim
    from medsr.eval.protocol import evaluate, iter_folder, list_images, retina_config

    cfg = retina_config(sigma=1.0, lpips=False)
    assert (cfg.scale, cfg.size, cfg.color, cfg.resample, cfg.vessels) == (2, 512, "rgb", "lanczos", True)
    assert "RGB" in cfg.describe() and "Lanczos" in cfg.describe()
    res = evaluate(iter_folder(list_images(_fundus_folder(tmp_path))), {}, cfg)
    s = res.sample
    assert s is not None and s.gt.shape == (512, 512, 3) and s.lr.shape == (256, 256, 3) and s.mask is not None
    bic = [r for r in res.records if r["method"] == "bicubic" and r["image"] == s.image][0]
    sr = s.outputs["bicubic"]
    assert bic["psnr"] == pytest.approx(psnr(sr, s.gt, crop=2, y_channel=False))
    assert bic["psnr"] != pytest.approx(psnr(sr, s.gt, crop=2, y_channel=True))
    assert bic["ssim"] == pytest.approx(ssim(sr, s.gt, crop=2, y_channel=False))
    assert np.isfinite(bic["vessel_psnr"]) and bic["vessel_psnr"] < bic["psnr"]
    assert {r["method"] for r in res.records} == {"bicubic", "lanczos"}


def test_eval_cli_retina_protocol_reports_vessels_and_an_unavailable_comparator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medsr.cli.eval import main
    from medsr.weights import load as load_mod

    # no x4plus weights: none in the (isolated) cache, and the ncnn package's copy hidden
    monkeypatch.setattr(load_mod, "packaged_param", lambda *a: None)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(_fundus_folder(tmp_path)), "--protocol", "retina", "--sigma", "1.5",
                                  "--no-lpips", "-q", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "retina protocol" in r.output and "RGB" in r.output and "sigma=1.5" in r.output
    assert "vessel PSNR" in r.output
    assert "realesrgan-x4plus (x4 at x2 output) | 0 | not available:" in r.output  # no weights here
    assert (out / "vessels.png").is_file() and (out / "figure.png").is_file()
    rows = (out / "results.csv").read_text().splitlines()
    assert "vessel_psnr" in rows[0] and any("not available" in x for x in rows)


def test_eval_cli_retina_runs_an_x4_model_at_x2_output(tmp_path: Path) -> None:
    from conftest import tiny_rrdb

    from medsr.cli.eval import main
    from medsr.weights import save_weights

    w = tmp_path / "x4.pth"
    save_weights(tiny_rrdb(4, 3), w, "tiny-x4")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(_fundus_folder(tmp_path, 1)), "--protocol", "retina", "--model", str(w),
                                  "--no-comparator", "--no-lpips", "-q", "--out", str(out), "--tile", "64"])
    assert r.exit_code == 0, r.output
    assert "x4 at x2 output" in r.output and "not available" not in r.output
