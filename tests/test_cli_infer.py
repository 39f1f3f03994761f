from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SECRET_ID, SECRET_NAME, make_cr, tiny_rrdb

from medsr.cli.infer import main


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny_x4.pth"
    torch.save({"params_ema": tiny_rrdb(4, 3).state_dict()}, p)
    return p


@pytest.fixture
def folder(tmp_path: Path, rng: np.random.Generator) -> Path:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    cv2.imwrite(str(d / "gray8.png"), (rng.random((13, 17)) * 255).astype(np.uint8))
    cv2.imwrite(str(d / "sub" / "gray16.png"), (rng.random((11, 9)) * 65535).astype(np.uint16))
    cv2.imwrite(str(d / "sub" / "rgb.tif"), (rng.random((8, 10, 3)) * 255).astype(np.uint8))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(64))
    (d / "notes.txt").write_text("not an image")
    return d


def _run(*args: str):
    return CliRunner().invoke(main, ["--quiet", "--device", "cpu", "--tile", "16", "--overlap", "4", *args])


def test_folder_with_bad_files(folder: Path, tmp_path: Path, model_path: Path) -> None:
    before = _digest(folder)
    out = tmp_path / "out"
    res = _run("--model", str(model_path), str(folder), "-o", str(out))
    assert res.exit_code == 1, res.output
    # good files written, mirroring structure, same format and bit depth
    g8 = cv2.imread(str(out / "gray8.png"), cv2.IMREAD_UNCHANGED)
    g16 = cv2.imread(str(out / "sub" / "gray16.png"), cv2.IMREAD_UNCHANGED)
    rgb = cv2.imread(str(out / "sub" / "rgb.tif"), cv2.IMREAD_UNCHANGED)
    assert g8.dtype == np.uint8 and g8.shape == (52, 68)
    assert g16.dtype == np.uint16 and g16.shape == (44, 36)
    assert rgb.shape == (32, 40, 3)
    # the corrupt image fails (by name); a non-image beside the scans is reported as ignored;
    # no partial or temporary files are left behind
    assert "corrupt.png" in res.output and "ignored (not an image): " in res.output and "notes.txt" in res.output
    assert "3 written" in res.output and "1 failed" in res.output and "1 ignored" in res.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "gray8.png", "sub/gray16.png", "sub/rgb.tif"]
    assert "Traceback" not in res.output
    # inputs untouched
    assert _digest(folder) == before

    # a re-run skips existing outputs; --overwrite replaces them
    stamp = (out / "gray8.png").stat().st_mtime_ns
    res2 = _run("--model", str(model_path), str(folder), "-o", str(out))
    assert "3 skipped" in res2.output and res2.exit_code == 1
    assert (out / "gray8.png").stat().st_mtime_ns == stamp
    res3 = _run("--model", str(model_path), "--overwrite", str(folder / "gray8.png"), "-o", str(out))
    assert res3.exit_code == 0 and "1 written" in res3.output


def test_never_writes_over_an_input(folder: Path, model_path: Path) -> None:
    before = _digest(folder)
    res = _run("--model", str(model_path), "--overwrite", str(folder / "gray8.png"), "-o", str(folder))
    assert res.exit_code == 1 and "overwrite an input" in res.output
    assert _digest(folder) == before


def test_missing_model_is_one_clear_line(folder: Path, tmp_path: Path) -> None:
    res = _run("--model", str(tmp_path / "nope.pth"), str(folder), "-o", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert "cannot load the model" in res.output and "nope.pth" in res.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_engine_and_model_are_exclusive(folder: Path, model_path: Path, tmp_path: Path) -> None:
    res = _run("--model", "x", "--engine", str(model_path), str(folder), "-o", str(tmp_path / "o"))
    assert res.exit_code == 2 and "not both" in res.output


def test_dicom_through_the_cli(tmp_path: Path, model_path: Path) -> None:
    import pydicom

    ds = make_cr("MONOCHROME1", bits_stored=12, h=10, w=12)
    src = tmp_path / "dcm" / "IMG0001"
    src.parent.mkdir()
    ds.save_as(src, enforce_file_format=True)
    res = _run("--model", str(model_path), str(src.parent), "-o", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    out = pydicom.dcmread(tmp_path / "o" / "IMG0001")
    assert (out.Rows, out.Columns, out.PhotometricInterpretation) == (40, 48, "MONOCHROME1")
    assert SECRET_NAME not in res.output and SECRET_ID not in res.output


def test_bad_tiling_arguments_are_usage_errors(folder: Path, tmp_path: Path) -> None:
    x2 = tmp_path / "tiny_x2.pth"
    torch.save({"params_ema": tiny_rrdb(2, 3).state_dict()}, x2)
    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["-q", "--device", "cpu", "--model", str(x2), "--tile", "16", "--overlap", "16",
                                    str(folder), "-o", str(out)])
    assert res.exit_code == 2 and "overlap must be smaller" in res.output
    # an x2 model needs tile and overlap on its pixel-unshuffle grid (multiples of 2)
    res = CliRunner().invoke(main, ["-q", "--device", "cpu", "--model", str(x2), "--tile", "17", "--overlap", "4",
                                    str(folder), "-o", str(out)])
    assert res.exit_code == 2 and "multiple of 2" in res.output
    assert not out.exists()


def test_unsupported_file_named_explicitly_fails(folder: Path, tmp_path: Path, model_path: Path) -> None:
    res = _run("--model", str(model_path), str(folder / "notes.txt"), str(folder / "gray8.png"), "-o", str(tmp_path / "o"))
    assert res.exit_code == 1 and "notes.txt" in res.output and "1 written" in res.output and "1 failed" in res.output


def test_uid_named_dicom_is_found_by_content(tmp_path: Path, model_path: Path) -> None:
    ds = make_cr(bits_stored=8, h=8, w=8)
    d = tmp_path / "study"
    d.mkdir()
    ds.save_as(d / "1.2.840.113619.2.55.3", enforce_file_format=True)  # suffix ".3", DICOM by content
    res = _run("--model", str(model_path), str(d), "-o", str(tmp_path / "o"))
    assert res.exit_code == 0 and "1 written" in res.output, res.output
    assert (tmp_path / "o" / "1.2.840.113619.2.55.3").is_file()


def test_compile_is_for_pytorch_models_only(folder: Path, tmp_path: Path) -> None:
    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"x")
    res = _run("--engine", str(fake), "--compile", str(folder), "-o", str(tmp_path / "o"))
    assert res.exit_code == 2 and "--compile applies to PyTorch" in res.output
