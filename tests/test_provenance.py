"""Every output says what made it; medsr-infer skips only what this very job made, decided before loading."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner
from conftest import make_cr, tiny_rrdb

from medsr.io.provenance import format_provenance, parse_provenance, read_provenance, same_job

pytestmark = pytest.mark.quick

PROV = {"version": "0.1.0", "model": "m", "weights-sha256": "a" * 64, "source-sha256": "b" * 64, "scale": "x4",
        "runtime": "openvino", "precision": "fp32"}


def _weights(path: Path, seed: int = 0) -> Path:
    torch.save({"params_ema": tiny_rrdb(4, 3, seed=seed).state_dict()}, path)
    return path


def _infer(*args: str):
    from medsr.cli.infer import main

    return CliRunner().invoke(main, ["-q", "--device", "cpu", "--tile", "16", "--overlap", "4", *args])


def test_text_round_trip_and_matching() -> None:
    line = format_provenance(PROV)
    assert line.startswith("medsr 0.1.0; model m;") and "runtime openvino; precision fp32" in line
    assert parse_provenance("Super-resolution x4 by a neural network: model m, weights ...; " + line) == PROV
    assert parse_provenance("written by another tool") is None
    assert same_job(PROV, {"source-sha256": "b" * 64, "runtime": "openvino", "precision": "fp32"})
    assert same_job(PROV, {"source-sha256": "b" * 64, "runtime": "openvino", "precision": None})  # unknown: not compared
    assert not same_job(PROV, {"source-sha256": "b" * 64, "runtime": "torch", "precision": "fp32"})
    assert not same_job(PROV, {"source-sha256": "c" * 64, "runtime": "openvino", "precision": "fp32"})
    assert not same_job(None, {"runtime": "openvino"})


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_raster_outputs_carry_provenance_and_pixels_are_unchanged(tmp_path: Path, suffix: str,
                                                                  rng: np.random.Generator) -> None:
    from medsr.io import make_output, read_image, write_image

    src = tmp_path / f"in{suffix}"
    cv2.imwrite(str(src), (rng.random((8, 10)) * 255).astype(np.uint8))
    img = read_image(src)
    hr = np.repeat(np.repeat(img.pixels, 2, 0), 2, 1)
    plain = write_image(make_output(img, hr, 2, "m"), tmp_path / f"plain{suffix}")
    marked = write_image(make_output(img, hr, 2, "m", provenance=PROV), tmp_path / f"marked{suffix}")
    assert read_provenance(plain) is None and read_provenance(src) is None
    assert read_provenance(marked) == PROV
    assert np.array_equal(read_image(marked).pixels, read_image(plain).pixels)
    raw = marked.read_bytes()
    if suffix == ".png":
        assert b"tEXtmedsr\0medsr 0.1.0; model m" in raw and b"tEXtSoftware\0medsr 0.1.0" in raw
    elif suffix == ".jpg":
        assert b"\xff\xfe" in raw[:200] and b"medsr 0.1.0; model m" in raw[:400]
    else:
        import tifffile

        with tifffile.TiffFile(marked) as tf:
            assert tf.pages[0].software == "medsr 0.1.0" and "runtime openvino" in tf.pages[0].description


def test_api_outputs_name_model_runtime_precision_and_dicom_uids_depend_on_them(tmp_path: Path) -> None:
    from medsr import Upscaler
    from medsr.io.dicom_derive import derived_uids

    w = _weights(tmp_path / "tiny.pth")
    src = tmp_path / "a.dcm"
    make_cr(bits_stored=8, h=8, w=8).save_as(src, enforce_file_format=True)
    up = Upscaler.load(w, runtime="torch", device="cpu", tile=16, overlap=4)
    assert (up.runtime, up.precision) == ("torch", "fp32")
    prov = up.provenance()
    assert prov["runtime"] == "torch" and prov["scale"] == "x4" and prov["source-sha256"] == prov["weights-sha256"]
    out = up.upscale_file(src, tmp_path / "o" / "a.dcm")
    assert read_provenance(out) == prov
    ds = pydicom.dcmread(out)
    src_ds = pydicom.dcmread(src)
    sha = prov["weights-sha256"]
    assert ds.SOPInstanceUID == derived_uids(src_ds, "tiny", 4, weights_sha256=sha, provenance=prov)[0]
    other = derived_uids(src_ds, "tiny", 4, weights_sha256=sha, provenance={**prov, "runtime": "openvino"})[0]
    assert other != ds.SOPInstanceUID  # another runtime: another instance
    assert derived_uids(src_ds, "tiny", 4, weights_sha256=sha, provenance={**prov, "precision": "bf16"})[0] != other


def test_job_provenance_is_known_before_loading_and_matches_what_load_writes(tmp_path: Path) -> None:
    from medsr import Upscaler
    from medsr.api import job_provenance

    w = _weights(tmp_path / "tiny.pth")
    for runtime in ("torch", "auto"):
        job = job_provenance(w, runtime=runtime, device="cpu")
        up = Upscaler.load(w, runtime=runtime, device="cpu")
        assert same_job(up.provenance(), job), (runtime, job, up.provenance())


def test_rerun_skips_only_outputs_of_the_same_job_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  rng: np.random.Generator) -> None:
    a, b = _weights(tmp_path / "a.pth", 0), _weights(tmp_path / "b.pth", 1)
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "x.png"), (rng.random((12, 12)) * 255).astype(np.uint8))
    cv2.imwrite(str(src / "y.tif"), (rng.random((12, 12)) * 65535).astype(np.uint16))
    out = tmp_path / "out"
    r = _infer("--runtime", "torch", "--model", str(a), str(src), "-o", str(out))
    assert r.exit_code == 0 and "2 written" in r.output, r.output
    first = (out / "x.png").read_bytes()

    from medsr import api

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded although every output exists")

    monkeypatch.setattr(api.Upscaler, "load", classmethod(no_load))
    r = _infer("--runtime", "torch", "--model", str(a), str(src), "-o", str(out))  # same job: skipped, no load
    assert r.exit_code == 0 and "0 written, 2 skipped" in r.output, r.output
    r = _infer("--runtime", "torch", "--model", str(b), str(src), "-o", str(out))  # another model: refused
    assert r.exit_code == 1 and "2 failed" in r.output and "pass --overwrite" in r.output, r.output
    assert r.output.count("failed: ") == 2 and (out / "x.png").read_bytes() == first
    r = _infer("--runtime", "openvino", "--model", str(a), str(src), "-o", str(out))  # another runtime: refused
    assert r.exit_code == 1 and "not by this job" in r.output
    monkeypatch.undo()
    r = _infer("--runtime", "torch", "--model", str(b), "--overwrite", str(src), "-o", str(out))
    assert r.exit_code == 0 and "2 written" in r.output
    assert read_provenance(out / "x.png")["source-sha256"] == read_provenance(out / "y.tif")["source-sha256"]
    assert (out / "x.png").read_bytes() != first


def test_foreign_file_in_the_output_is_refused_not_skipped(tmp_path: Path, rng: np.random.Generator) -> None:
    w = _weights(tmp_path / "tiny.pth")
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "x.png"), (rng.random((8, 8)) * 255).astype(np.uint8))
    (tmp_path / "out").mkdir()
    cv2.imwrite(str(tmp_path / "out" / "x.png"), np.zeros((4, 4), np.uint8))  # not medsr's
    r = _infer("--runtime", "torch", "--model", str(w), str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert r.exit_code == 1 and "without medsr provenance" in r.output


def test_dicom_with_a_raster_name_keeps_a_dicom_output(tmp_path: Path) -> None:
    w = _weights(tmp_path / "tiny.pth")
    d = tmp_path / "in"
    d.mkdir()
    make_cr(bits_stored=8, h=8, w=8).save_as(d / "looks_like.png", enforce_file_format=True)
    r = _infer("--runtime", "torch", "--model", str(w), str(d), "-o", str(tmp_path / "o"))
    assert r.exit_code == 0 and "1 written" in r.output, r.output
    out = tmp_path / "o" / "looks_like.dcm"
    assert pydicom.dcmread(out).Rows == 32 and not (tmp_path / "o" / "looks_like.png").exists()


def test_api_load_and_cli_default_give_the_same_file(tmp_path: Path, rng: np.random.Generator) -> None:
    """One loading rule: Upscaler.load with no runtime/precision is what medsr-infer runs (bit for bit)."""
    from medsr import Upscaler

    w = _weights(tmp_path / "tiny.pth")
    src = tmp_path / "in" / "x.png"
    src.parent.mkdir()
    cv2.imwrite(str(src), (rng.random((12, 14)) * 255).astype(np.uint8))
    r = _infer("--model", str(w), str(src), "-o", str(tmp_path / "cli"))
    assert r.exit_code == 0, r.output
    api_out = Upscaler.load(w, device="cpu", tile=16, overlap=4).upscale_file(src, tmp_path / "api" / "x.png")
    assert api_out.read_bytes() == (tmp_path / "cli" / "x.png").read_bytes()
