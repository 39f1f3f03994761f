"""Shared fixtures. Tests are CPU-only and fast: tiny RRDB configs, synthetic images.

Real samples in ../shared/data are optional: tests that use them skip when absent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's weight cache from tests."""
    monkeypatch.setenv("MEDSR_HOME", str(tmp_path_factory.mktemp("medsr_home")))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not present at {SHARED_DATA}")
    return SHARED_DATA


def tiny_rrdb(scale: int = 4, channels: int = 3, seed: int = 0, num_feat: int = 8, num_block: int = 1, num_grow_ch: int = 4):
    """A seeded tiny RRDBNet (BasicSR layout), eval mode."""
    from medsr.arch import RRDBNet

    g = torch.Generator().manual_seed(seed)
    m = RRDBNet(channels, channels, scale, num_feat, num_block, num_grow_ch)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny models on a shared 2-core machine run faster so)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- a synthetic computed radiograph (DICOM), shared by the io, API and CLI tests -------------------
CRImageStorage = "1.2.840.10008.5.1.4.1.1.1"
SECRET_NAME = "SECRETSURNAME^GIVEN"
SECRET_ID = "PID-SECRET-4711"


def make_cr(
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    h: int = 20,
    w: int = 16,
    seed: int = 0,
    signed: bool = False,
) -> Dataset:
    rng = np.random.default_rng(seed)
    if signed:
        px = rng.integers(-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1), size=(h, w), dtype=np.int16)
    else:
        px = rng.integers(0, 2**bits_stored, size=(h, w), dtype=np.uint16)
        px[0, 0], px[0, 1] = 0, 2**bits_stored - 1
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CRImageStorage
    ds.SOPClassUID = CRImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["test-sop", str(seed), photometric])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["test-study", str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["test-series", str(seed)])
    ds.Modality = "CR"
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20240102"
    ds.AccessionNumber = "ACC-SECRET-1"
    ds.SeriesDescription = "CHEST PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PixelSpacing = [0.2, 0.15]
    ds.ImagerPixelSpacing = ["0.143", "0.143"]
    ds.RescaleSlope = "2"
    ds.RescaleIntercept = "-1024"
    ds.RescaleType = "US"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "10"
    ds.LossyImageCompressionMethod = "ISO_15444_1"
    ds.BurnedInAnnotation = "YES"
    ds.SmallestImagePixelValue = 0
    ds.set_pixel_data(px, photometric, bits_stored, generate_instance_uid=False)
    return ds


#: whole files in the quick development subset (``pytest -m quick``, README): unit tests without real servers,
#: real-size models or subprocess runs; single tests elsewhere carry ``@pytest.mark.quick`` themselves
QUICK_FILES = frozenset({"test_io.py", "test_tiling.py", "test_arch.py", "test_cli_infer.py",
                         "test_structure.py", "test_cli_options.py", "test_provenance.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in QUICK_FILES:
            item.add_marker(pytest.mark.quick)
