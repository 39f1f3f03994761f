"""Integration: dciodvfy (dicom3tools) finds no error or warning in a derived instance that its
source does not already have. Runs on every shared DICOM sample (../shared/data/dicom) and on the
sample files that ship with pydicom (CT, MR with an overlay, multi-frame ultrasound, multi-frame
RGB secondary capture). The "model" is pixel replication: this checks the header, not the pixels,
so it stays fast."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from conftest import SHARED_DATA  # noqa: E402

from medsr.io import make_output, read_image, write_image  # noqa: E402
from medsr.io.dicom_derive import derive_frames  # noqa: E402

SHARED_DICOM = SHARED_DATA / "dicom"
SHARED = sorted(p.name for p in SHARED_DICOM.glob("*.dcm")) if SHARED_DICOM.is_dir() else ["(none)"]
BUNDLED = ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm"]


@pytest.fixture(scope="module")
def dciodvfy() -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("skipped: dciodvfy not installed (Debian/Ubuntu: apt-get install dicom3tools)")
    return exe


def messages(exe: str, path: Path) -> set[str]:
    """dciodvfy's errors and warnings, values cut off (they may differ; they may be patient data)."""
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    out = set()
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith(("Error", "Warning")):
            out.add(re.sub(r"\s+", " ", line.split(" = ")[0]).strip())
    return out


def derive_and_check(exe: str, src: Path, tmp_path: Path, syntax: str | None = None) -> Path:
    img = read_image(src)
    weights = "c" * 64
    if img.frames > 1:
        out = derive_frames(img, lambda f: np.repeat(np.repeat(f.pixels, 2, 0), 2, 1), 2, "replicate",
                            weights_sha256=weights, syntax=syntax)
    else:
        px = np.repeat(np.repeat(img.pixels, 2, 0), 2, 1)
        out = make_output(img, px, 2, "replicate", weights_sha256=weights, dicom_syntax=syntax)
    dst = write_image(out, tmp_path / src.name)
    new = messages(exe, dst) - messages(exe, src)
    assert not new, f"{src.name}: dciodvfy reports what the source does not have:\n" + "\n".join(sorted(new))
    return dst


@pytest.mark.parametrize("name", SHARED)
def test_shared_samples_pass_dciodvfy(dciodvfy: str, name: str, tmp_path: Path) -> None:
    if not SHARED_DICOM.is_dir():
        pytest.skip(f"skipped: shared data not present ({SHARED_DICOM})")
    dst = derive_and_check(dciodvfy, SHARED_DICOM / name, tmp_path)
    assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless


@pytest.mark.parametrize("name", BUNDLED)
def test_pydicom_samples_pass_dciodvfy(dciodvfy: str, name: str, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom sample {name} not available")
    derive_and_check(dciodvfy, Path(path), tmp_path)


@pytest.mark.parametrize("syntax", ["rle", "explicit-le", "jpeg2000-lossy:20"])
def test_other_syntaxes_pass_dciodvfy(dciodvfy: str, syntax: str, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    dst = derive_and_check(dciodvfy, Path(get_testdata_file("CT_small.dcm")), tmp_path, syntax)
    if syntax.startswith("jpeg2000-lossy"):
        assert pydicom.dcmread(dst).LossyImageCompression == "01"
