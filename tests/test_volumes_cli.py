"""medsr-infer / medsr-eval / medsr-train on volumes: detection, outputs, refusals, skip rules (tiny x1 model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_volumes_io import make_series

from medsr.cli.infer import main as infer_main


@pytest.fixture()
def tiny_x1(tmp_path: Path) -> Path:
    from medsr.arch import RRDBNet

    torch.manual_seed(0)
    m = RRDBNet(1, 1, 1, num_feat=8, num_block=1, num_grow_ch=4)
    p = tmp_path / "tiny_x1.pth"
    torch.save({"params_ema": m.state_dict()}, p)
    return p


def _nifti(path: Path, shape=(20, 18, 6), zooms=(1.0, 1.0, 3.0), dtype=np.int16) -> Path:
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 1000).astype(dtype)
    aff = np.diag([*zooms, 1.0])
    aff[:3, 3] = [-9.0, 4.0, 30.0]
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return path


def test_nifti_file_goes_through_the_volume_path(tmp_path: Path, tiny_x1: Path) -> None:
    src = _nifti(tmp_path / "t2_thick.nii.gz")
    out = tmp_path / "out"
    r = CliRunner().invoke(infer_main, [str(src), "-o", str(out), "--model", str(tiny_x1), "-q",
                                        "--runtime", "torch"])
    assert r.exit_code == 0, r.output
    assert "one volume" in r.output and "factor 3" in r.output
    img = nib.load(str(out / "t2_thick.nii.gz"))
    assert img.shape == (20, 18, 18)
    assert np.allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))
    assert img.get_data_dtype() == np.int16
    # thin slices tile the thick slab: the first thin slice centre is one thin slice below the first thick one
    assert np.allclose(img.affine[:3, 3], [-9.0, 4.0, 29.0])
    # a second run skips the existing output without loading the model
    r2 = CliRunner().invoke(infer_main, [str(src), "-o", str(out), "--model", "no-such-model", "-q"])
    assert r2.exit_code == 0, r2.output
    assert "1 skipped" in r2.output


def test_isotropic_volume_refused_unless_factor_and_batch_goes_on(tmp_path: Path, tiny_x1: Path) -> None:
    iso = _nifti(tmp_path / "iso.nii.gz", zooms=(1.0, 1.0, 1.0))
    thick = _nifti(tmp_path / "thick.nii", zooms=(1.0, 1.0, 2.0))
    out = tmp_path / "out"
    r = CliRunner().invoke(infer_main, [str(iso), str(thick), "-o", str(out), "--model", str(tiny_x1), "-q",
                                        "--runtime", "torch"])
    assert r.exit_code == 1
    assert "isotropic" in r.output and "iso.nii.gz" in r.output
    assert (out / "thick.nii").exists() and not (out / "iso.nii.gz").exists()
    r = CliRunner().invoke(infer_main, [str(iso), "-o", str(out), "--model", str(tiny_x1), "-q", "--factor", "2",
                                        "--runtime", "torch"])
    assert r.exit_code == 0, r.output
    assert nib.load(str(out / "iso.nii.gz")).shape == (20, 18, 12)


def test_a_2d_model_is_refused_for_volumes(tmp_path: Path) -> None:
    src = _nifti(tmp_path / "v.nii.gz")
    r = CliRunner().invoke(infer_main, [str(src), "-o", str(tmp_path / "o"), "--model", "medsr-cxr-x4-fast", "-q",
                                        "--runtime", "torch"])
    assert r.exit_code == 2
    assert "x1 through-plane model" in r.output


def test_dicom_series_folder_is_one_volume_and_gives_a_derived_series(tmp_path: Path, tiny_x1: Path) -> None:
    import pydicom

    series = tmp_path / "in" / "ct_series"
    make_series(series, n=5, rows=24, cols=28, step=(0, 0, 3.0), spacing=(1.5, 1.5))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    r = CliRunner().invoke(infer_main, [str(tmp_path / "in"), "-o", str(out), "--model", str(tiny_x1), "-q",
                                        "--runtime", "torch", "--dicom-syntax", "explicit-le"])
    assert r.exit_code == 0, r.output
    assert "DICOM series" in r.output and "one volume" in r.output
    files = sorted((out / "ct_series").glob("*.dcm"))
    assert len(files) == 10  # 5 slices x factor 2
    dss = [pydicom.dcmread(f) for f in files]
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    z = sorted(float(d.ImagePositionPatient[2]) for d in dss)
    assert np.allclose(np.diff(z), 1.5)
    assert all("DERIVED" in d.ImageType for d in dss)


def test_eval_volumes_writes_a_table_with_the_baselines(tmp_path: Path, tiny_x1: Path) -> None:
    from medsr.cli.eval import main as eval_main

    data = tmp_path / "vols"
    data.mkdir()
    x, y, z = np.meshgrid(np.linspace(-1, 1, 24), np.linspace(-1, 1, 20), np.linspace(-1, 1, 16), indexing="ij")
    phantom = ((x**2 + y**2 + z**2) < 0.6).astype(np.float32) * 100 + 20 * np.sin(4 * z)
    nib.save(nib.Nifti1Image(phantom, np.eye(4)), str(data / "phantom.nii.gz"))
    out = tmp_path / "ev"
    r = CliRunner().invoke(eval_main, [str(data), "--volumes", "--model", str(tiny_x1), "--factor", "2",
                                       "-o", str(out)])
    assert r.exit_code == 0, r.output
    text = (out / "summary.md").read_text()
    for m in ("nearest", "linear", "bspline", "bspline+dc", "tiny_x1"):
        assert f"| phantom | 2 | {m} |" in text
    rows = {ln.split("|")[3].strip(): float(ln.split("|")[4]) for ln in text.splitlines() if ln.startswith("| phantom")}
    assert rows["bspline"] > rows["nearest"]  # the baselines are real reconstructions, not placeholders
    assert rows["bspline+dc"] > rows["bspline"]  # the projection undoes part of the slice profile's blur
    assert (out / "fig_phantom_r2.png").stat().st_size > 1000


def test_train_volumes_and_adapt_smoke(tmp_path: Path, tiny_x1: Path) -> None:
    data = tmp_path / "vols"
    data.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        arr = rng.random((40, 40, 40)).astype(np.float32)
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(data / f"{name}.nii.gz"))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "medsr.cli.train", "--volumes", str(data), "--holdout", "b", "-o", str(run),
           "--from-scratch", "--model-override", "num_block=1,num_feat=8,num_grow_ch=4", "--max-iters", "4",
           "--batch", "2", "--crop", "32", "-q", "--set", "train.val_every=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "validation pairs from 1 held-out" in r.stderr
    weights = run / "mr_through_plane.pth"
    assert weights.exists()
    from medsr.volumes.throughplane import THROUGH_PLANE_CONTRACT
    from medsr.weights import load_model

    assert load_model(str(weights)).model.contract == THROUGH_PLANE_CONTRACT  # the config's contract is recorded
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(rng.random((40, 36, 8)), (2, 2, 1))
    smooth = (100 + 800 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.int16)
    thick = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(smooth, np.diag([1.0, 1.0, 3.0, 1.0])), str(thick))
    run2 = tmp_path / "adapt"
    cmd = [sys.executable, "-m", "medsr.cli.train", "--adapt", str(thick), "--pretrained", str(weights),
           "-o", str(run2), "--minutes", "0.1", "--max-iters", "3", "--batch", "2", "--crop", "32", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "in-plane slices" in r.stderr and "factor 3" in r.stderr
    assert (run2 / "mr_through_plane.pth").exists()
    assert load_model(str(run2 / "mr_through_plane.pth")).model.contract == THROUGH_PLANE_CONTRACT
    # the adapted (contract v2) model through medsr-infer on OpenVINO: the output re-acquires the thick slices
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "medsr.cli.infer", str(thick), "-o", str(out), "--model",
                        str(run2 / "mr_through_plane.pth"), "--runtime", "openvino", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from medsr.volumes.consistency import forward_matrix

    hr = np.asarray(nib.load(str(out / "scan.nii.gz")).dataobj).astype(np.float64)
    lr = np.asarray(nib.load(str(thick)).dataobj).astype(np.float64)
    a = forward_matrix((np.arange(24) + 0.5) / 3 - 0.5, 8)
    assert hr.shape == (40, 36, 24)
    misfit = np.abs(np.einsum("kn,ijn->ijk", a, hr) - lr)
    assert np.median(misfit) < 1.0 and np.mean(misfit < 2.0) > 0.9  # exact up to rounding and clipping
