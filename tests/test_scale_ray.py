"""medsr-infer --ray: the same job on a real local Ray cluster (ray.init(num_cpus=2)), compared with the
local CLI bit for bit; bad files, skips and refusals behave the same."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_cr, tiny_rrdb

ray = pytest.importorskip("ray", reason="skipped: Ray is not installed (pip install 'ray[data]')")
pytestmark = pytest.mark.timeout(1200)  # a real Ray cluster on a possibly busy machine


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.pth"
    torch.save({"params_ema": tiny_rrdb(2, 3, seed=7).state_dict()}, p)
    return p


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    cv2.imwrite(str(src / "a16.png"), (rng.random((40, 48)) * 65535).astype(np.uint16))
    cv2.imwrite(str(src / "b8.png"), (rng.random((33, 20)) * 255).astype(np.uint8))
    cv2.imwrite(str(src / "sub" / "c.tif"), (rng.random((24, 30)) * 65535).astype(np.uint16))
    make_cr(h=28, w=36, seed=5).save_as(src / "sub" / "d.dcm", enforce_file_format=True)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (src / "manifest.csv").write_text("a,b\n")
    return src


def _infer(*args: str) -> tuple[int, str]:
    from medsr.cli.infer import main

    r = CliRunner().invoke(main, ["-q", "--device", "cpu", "--runtime", "torch", "--tile", "16", "--overlap", "4",
                                  *args])
    return r.exit_code, r.output


def _summary(out: str) -> str:
    line = next(ln for ln in out.splitlines() if ln.startswith("medsr-infer: ") and " written, " in ln)
    return line.split(";")[0]


def test_ray_output_equals_the_local_cli(local_ray, tmp_path: Path, weights: Path) -> None:
    src = _folder(tmp_path)
    code_l, out_l = _infer("--model", str(weights), str(src), "-o", str(tmp_path / "local"))
    code_r, out_r = _infer("--model", str(weights), str(src), "-o", str(tmp_path / "ray"), "--ray", "--workers", "1")
    assert code_l == code_r == 1, (out_l, out_r)  # the broken file fails both runs, nothing else does
    assert _summary(out_r) == _summary(out_l) == ("medsr-infer: 4 written, 0 skipped (same job already written), 1 failed, 1 ignored (not images or not "
                                                       "regular files)")
    assert "broken.png" in out_r and out_r.count("failed: ") == 1  # one line per failure, with the summary
    files_l = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    files_r = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert files_l == files_r == sorted(Path(p) for p in ["a16.png", "b8.png", "sub/c.tif", "sub/d.dcm"])
    for rel in ("a16.png", "b8.png", "sub/c.tif"):
        assert (tmp_path / "local" / rel).read_bytes() == (tmp_path / "ray" / rel).read_bytes(), rel
    import pydicom

    dl, dr = pydicom.dcmread(tmp_path / "local" / "sub/d.dcm"), pydicom.dcmread(tmp_path / "ray" / "sub/d.dcm")
    assert dl.SOPInstanceUID == dr.SOPInstanceUID and dl.SeriesInstanceUID == dr.SeriesInstanceUID
    assert np.array_equal(dl.pixel_array, dr.pixel_array) and dr.pixel_array.shape == (56, 72)


def test_ray_rerun_skips_existing_outputs_and_overwrite_replaces_them(local_ray, tmp_path: Path, weights: Path) -> None:
    src = _folder(tmp_path)
    (src / "broken.png").unlink()
    out = tmp_path / "out"
    assert _infer("--model", str(weights), str(src), "-o", str(out), "--ray")[0] == 0
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    os.utime(out / "a16.png", ns=(1, 1))  # marks the file: a skip leaves it untouched
    code, text = _infer("--model", str(weights), str(src), "-o", str(out), "--ray")
    assert code == 0 and _summary(text).startswith("medsr-infer: 0 written, 4 skipped")
    assert (out / "a16.png").stat().st_mtime_ns == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "a16.png"} == {
        p: t for p, t in mtimes.items() if p.name != "a16.png"}
    code, text = _infer("--model", str(weights), str(src), "-o", str(out), "--ray", "--overwrite")
    assert code == 0 and _summary(text).startswith("medsr-infer: 4 written")
    assert (out / "a16.png").stat().st_mtime_ns != 1
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]  # no temp files left


def test_ray_never_writes_over_an_input(local_ray, tmp_path: Path, weights: Path) -> None:
    src = _folder(tmp_path)
    before = (src / "a16.png").read_bytes()
    code, text = _infer("--model", str(weights), str(src / "a16.png"), "-o", str(src), "--ray")
    assert code == 1 and "would overwrite an input" in text
    assert (src / "a16.png").read_bytes() == before


def test_ray_unknown_model_is_one_clear_line(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    code, text = _infer("--model", "no-such-model", str(src), "-o", str(tmp_path / "o"), "--ray")
    assert code == 2 and "cannot load the model: unknown model 'no-such-model'" in text
    assert "Traceback" not in text and not (tmp_path / "o").exists()


def test_a_pool_that_cannot_fit_is_refused(local_ray, tmp_path: Path, weights: Path) -> None:
    """2 actors of 1 CPU on a 2-CPU cluster would leave nothing for the read/write tasks: a hang, refused."""
    code, text = _infer("--model", str(weights), str(_folder(tmp_path)), "-o", str(tmp_path / "o"), "--ray",
                        "--workers", "2")
    assert code == 2 and "need 2.5 CPUs; the Ray cluster has 2: use fewer --workers" in text, text


def test_workers_needs_ray(tmp_path: Path, weights: Path) -> None:
    code, text = _infer("--model", str(weights), str(_folder(tmp_path)), "-o", str(tmp_path / "o"), "--workers", "2")
    assert code == 2 and "--workers applies to --ray" in text


# --- volumes on Ray: one volume per actor call, compared with the local volume path ---------------------------


@pytest.fixture
def tiny_x1(tmp_path: Path) -> Path:
    from medsr.arch import RRDBNet

    torch.manual_seed(0)
    p = tmp_path / "tiny_x1.pth"
    torch.save({"params_ema": RRDBNet(1, 1, 1, num_feat=8, num_block=1, num_grow_ch=4).state_dict()}, p)
    return p


def _volumes(root: Path) -> Path:
    """vols/: two thick-slice NIfTI volumes, an isotropic one (refused without --factor), a CT series folder."""
    nib = pytest.importorskip("nibabel")
    from test_volumes_io import make_series

    vols = root / "vols"
    vols.mkdir()
    rng = np.random.default_rng(4)
    for name, shape, zooms, dtype in (("a_thick.nii.gz", (20, 18, 6), (1.0, 1.0, 3.0), np.int16),
                                      ("b_thick.nii", (16, 22, 5), (0.8, 0.8, 1.6), np.float32),
                                      ("iso.nii.gz", (12, 12, 12), (1.0, 1.0, 1.0), np.int16)):
        aff = np.diag([*zooms, 1.0])
        aff[:3, 3] = [-9.0, 4.0, 30.0]
        nib.save(nib.Nifti1Image((rng.random(shape) * 1000).astype(dtype), aff), str(vols / name))
    make_series(vols / "ct_series", n=5, rows=24, cols=28, step=(0, 0, 3.0), spacing=(1.5, 1.5))
    return vols


@pytest.mark.timeout(600)  # a hang guard: a worker process starts and imports torch (slow on a loaded machine)
def test_ray_volumes_equal_the_local_cli(local_ray, tmp_path: Path, tiny_x1: Path, monkeypatch) -> None:
    """Relative paths (the workers do not share the driver's working directory), NIfTI and a DICOM series: the
    same files, voxels, affines, UIDs and summary as the local run; the isotropic volume fails both; --overwrite
    replaces an existing output, a re-run without it skips them all (without starting a worker)."""
    import nibabel as nib
    import pydicom

    _volumes(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ("--model", str(tiny_x1), "vols", "--dicom-syntax", "explicit-le")
    code_l, out_l = _infer(*args, "-o", "local")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    ray_out.mkdir()
    (ray_out / "b_thick.nii").write_bytes(b"stale output of an older run")
    code_r, out_r = _infer(*args, "-o", "ray", "--ray", "--overwrite")
    assert code_l == code_r == 1, (out_l, out_r)
    assert _summary(out_r) == _summary(out_l) == (
        "medsr-infer: 3 written, 0 skipped (same job already written), 1 failed, 0 ignored (not images or not regular files)")
    assert "isotropic" in out_r and "iso.nii.gz" in out_r and "failed: " in out_r
    assert "volumes run on Ray" in out_r and "factor 3" in out_r  # the actor's plan line reaches the driver
    files_l = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    files_r = sorted(p.relative_to(ray_out) for p in ray_out.rglob("*") if p.is_file())
    assert files_l == files_r and len(files_l) == 2 + 10, files_r  # 2 NIfTI + 5 slices x factor 2, no temp files
    for rel in ("a_thick.nii.gz", "b_thick.nii"):
        il, ir = nib.load(str(local / rel)), nib.load(str(ray_out / rel))
        assert ir.shape == il.shape and ir.get_data_dtype() == il.get_data_dtype()
        assert np.array_equal(np.asanyarray(il.dataobj), np.asanyarray(ir.dataobj)), rel
        assert np.array_equal(il.affine, ir.affine), rel
    assert nib.load(str(ray_out / "a_thick.nii.gz")).shape == (20, 18, 18)
    dcm = [p for p in files_l if p.suffix == ".dcm"]
    assert len(dcm) == 10
    for rel in dcm:
        dl, dr = pydicom.dcmread(local / rel), pydicom.dcmread(ray_out / rel)
        assert (dl.SOPInstanceUID, dl.SeriesInstanceUID) == (dr.SOPInstanceUID, dr.SeriesInstanceUID)
        assert np.array_equal(dl.pixel_array, dr.pixel_array) and dl.ImagePositionPatient == dr.ImagePositionPatient

    (tmp_path / "vols" / "iso.nii.gz").unlink()
    os.utime(ray_out / "b_thick.nii", ns=(1, 1))  # marks the file: a skip leaves it untouched
    code, text = _infer("--model", "no-such-model", *args[2:], "-o", "ray", "--ray")  # as locally: no model needed
    assert code == 0 and _summary(text) == (
        "medsr-infer: 0 written, 3 skipped (same job already written), 0 failed, 0 ignored (not images or not regular files)"), text
    assert (ray_out / "b_thick.nii").stat().st_mtime_ns == 1 and "volumes run on Ray" not in text


def test_ray_volumes_never_write_over_an_input_and_refuse_a_2d_model(local_ray, tmp_path: Path) -> None:
    vols = _volumes(tmp_path)
    before = (vols / "a_thick.nii.gz").read_bytes()
    code, text = _infer("--model", "medsr-cxr-x4-fast", str(vols / "a_thick.nii.gz"), "-o", str(vols), "--ray")
    assert code == 1 and "would overwrite an input" in text, text
    assert (vols / "a_thick.nii.gz").read_bytes() == before
    code, text = _infer("--model", "medsr-cxr-x4-fast", str(vols / "a_thick.nii.gz"), "-o", str(tmp_path / "o"),
                        "--ray")
    assert code == 2 and "cannot load the volume model" in text and "x1 through-plane model" in text, text
    assert "Traceback" not in text and not (tmp_path / "o" / "a_thick.nii.gz").exists()


def test_ray_rows_carry_absolute_paths_and_results_name_the_jobs_as_given(tmp_path: Path, monkeypatch) -> None:
    """Ray workers do not share the driver's working directory: on a cluster with a shared filesystem a
    relative path would name another file. The driver sends absolute paths; the rows it yields name the
    jobs as the user gave them (messages too), like the local CLI."""
    from medsr.scale.ray_batch import job_rows

    monkeypatch.chdir(tmp_path)
    rows = job_rows([(Path("in/a.png"), Path("out/a.png"))])
    assert rows == [{"src": str(tmp_path / "in/a.png"), "dst": str(tmp_path / "out/a.png")}]
    assert all(Path(v).is_absolute() for r in rows for v in r.values())


def test_ray_from_a_relative_path(local_ray, tmp_path: Path, weights: Path, monkeypatch) -> None:
    src = _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    rel = src.relative_to(tmp_path)
    code, out = _infer("--model", str(weights), str(rel), "-o", "ray_rel", "--ray", "--workers", "1")
    assert code == 1 and (tmp_path / "ray_rel" / "a16.png").is_file(), out
    assert f"{rel / 'broken.png'}" in out and str(tmp_path / rel / "broken.png") not in out
