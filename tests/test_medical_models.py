"""medsr's own shipped models: registry entries, pinned hashes, offline loading, the default choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medsr.api import Upscaler
from medsr.weights import DEFAULT_MODEL, MODELS, WeightsError, is_shipped, load_model, sha256_file
from medsr.weights import registry as reg

# packaged and pinned; medsr-retina-x2 joins once its trained file and sha256 land (tests/test_retina_choice.py)
SHIPPED = sorted(n for n, e in MODELS.items() if is_shipped(e))


def test_default_is_a_shipped_gray_x4_model() -> None:
    assert DEFAULT_MODEL == "medsr-cxr-x4"
    assert {"medsr-cxr-x4", "medsr-cxr-x4-fast", "medsr-mr-tp"} <= set(SHIPPED) <= {
        "medsr-cxr-x4", "medsr-cxr-x4-fast", "medsr-mr-tp", "medsr-retina-x2"}
    assert MODELS[DEFAULT_MODEL].packaged and MODELS[DEFAULT_MODEL].scale == 4


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_present_pinned_and_small(name: str) -> None:
    e = MODELS[name]
    path = reg.cached_path(e)
    assert path.parent == reg.packaged_dir() and path.is_file()
    assert path.stat().st_size == e.size and e.size < 8_000_000
    assert sha256_file(path) == e.sha256


@pytest.mark.parametrize(("name", "blocks", "feat"), [("medsr-cxr-x4", 6, 48), ("medsr-cxr-x4-fast", 4, 32)])
def test_shipped_model_loads_offline_and_upscales(name: str, blocks: int, feat: int) -> None:
    lm = load_model(name)
    m = lm.model
    assert lm.model_id == name and lm.sha256 == MODELS[name].sha256
    assert (m.num_in_ch, m.num_out_ch, m.scale, m.num_block, m.num_feat) == (1, 1, 4, blocks, feat)
    # a smooth gradient stays a smooth gradient of the same level (a faithful model, not a painter)
    yy, xx = np.mgrid[0:24, 0:24].astype(np.float32)
    lr = 0.3 + 0.4 * (xx + yy) / 46.0
    with torch.inference_mode():
        hr = m(torch.from_numpy(lr)[None, None])[0, 0].numpy()
    assert hr.shape == (96, 96)
    ref = np.kron(lr, np.ones((4, 4), np.float32))
    inner = (slice(8, -8), slice(8, -8))
    assert abs(float(hr[inner].mean() - ref[inner].mean())) < 0.01
    assert float(np.abs(hr[inner] - ref[inner]).max()) < 0.06


def test_shipped_volume_model_is_x1_gray_and_faithful_on_smooth_data() -> None:
    """The through-plane model refines B-spline interpolation: on a smooth volume it must stay close to it (no
    invented structure), and it must change something where there are through-plane edges."""
    from medsr.volumes import Volume
    from medsr.volumes.throughplane import reconstruct

    lm = load_model("medsr-mr-tp")
    m = lm.model
    assert (m.num_in_ch, m.num_out_ch, m.scale, m.num_block, m.num_feat) == (1, 1, 1, 4, 64)
    from medsr.volumes.throughplane import THROUGH_PLANE_CONTRACT

    assert m.contract == THROUGH_PLANE_CONTRACT  # the input it was trained on is the one the method gives it
    up = Upscaler.from_pretrained("medsr-mr-tp", tile=64, overlap=16)
    x, y, z = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 36), np.linspace(0, 1, 10), indexing="ij")
    smooth = Volume((200 + 300 * z + 100 * x).astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    base = reconstruct(smooth, None).array
    rec = reconstruct(smooth, up).array
    inner = (slice(4, -4), slice(4, -4), slice(6, -6))
    assert float(np.abs(rec[inner] - base[inner]).max()) < 0.02 * 400
    edges = Volume(np.where(z > 0.45, 500.0, 100.0).astype(np.float32) + 50 * x, np.diag([1.0, 1.0, 3.0, 1.0]))
    assert float(np.abs(reconstruct(edges, up).array - reconstruct(edges, None).array).max()) > 1.0


def test_from_pretrained_without_a_name_uses_the_default() -> None:
    up = Upscaler.from_pretrained(tile=32, overlap=8)
    assert up.model_id == DEFAULT_MODEL and up.scale == 4
    out = up(np.full((20, 28), 1000, np.uint16))
    assert out.shape == (80, 112) and out.dtype == np.uint16
    assert abs(float(out.mean()) - 1000) < 40


def test_tampered_shipped_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    e = MODELS["medsr-cxr-x4-fast"]
    fake = tmp_path / "models"
    fake.mkdir()
    data = bytearray(reg.cached_path(e).read_bytes())
    data[-1] ^= 0xFF
    (fake / e.filename).write_bytes(bytes(data))
    monkeypatch.setattr(reg, "packaged_dir", lambda: fake)
    with pytest.raises(WeightsError, match="reinstall medsr"):
        load_model("medsr-cxr-x4-fast")
    (fake / e.filename).unlink()
    with pytest.raises(WeightsError, match="should ship inside medsr"):
        load_model("medsr-cxr-x4-fast")


def test_medsr_infer_defaults_to_the_medical_model(tmp_path: Path) -> None:
    import cv2

    from medsr.cli.infer import main

    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.full((24, 20), 120, np.uint8))
    r = CliRunner().invoke(main, [str(src), "-o", str(tmp_path / "out"), "--tile", "32", "--overlap", "8"])
    assert r.exit_code == 0, r.output
    out = cv2.imread(str(tmp_path / "out" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert out.shape == (96, 80) and abs(float(out.mean()) - 120) < 5


def test_x4plus_stays_available_by_name() -> None:
    assert "realesrgan-x4plus" in MODELS and not MODELS["realesrgan-x4plus"].packaged


def test_package_data_declares_the_models() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"medsr.weights" = ["models/*.safetensors"]' in text
