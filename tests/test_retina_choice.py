"""Model choice for users (issue 21): the one rule (colour / gray, DICOM Modality OP / SOP class, explicit
name), the medsr-retina-x2 registry entry (not shipped yet -> a clear refusal), medsr-infer's log, and an
Ophthalmic Photography DICOM (YBR_FULL_422 JPEG baseline) round trip with a tiny RGB x2 model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from retina_helpers import OP_8BIT, fundus, write_rgb  # noqa: E402,F401

# ------------------------------------------------------------------------------------ model choice


def _dicom(tmp_path: Path, name: str, modality: str, sop: str, rgb: bool) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    px = np.round(fundus(24, 28) * 255).astype(np.uint8)
    ds.set_pixel_data(px if rgb else px[..., 1], "RGB" if rgb else "MONOCHROME2", 8, generate_instance_uid=False)
    p = tmp_path / name
    ds.save_as(p, enforce_file_format=True)
    return p


def test_choice_rule_by_colour_modality_sop_class_and_explicit_name(tmp_path: Path) -> None:
    from medsr.runtime.choice import choose_model
    from medsr.weights import DEFAULT_MODEL, RETINA_MODEL

    rgb_png = write_rgb(tmp_path / "rgb.png", fundus(20, 24))
    rgb_jpg = tmp_path / "rgb.jpg"
    cv2.imwrite(str(rgb_jpg), np.round(fundus(20, 24) * 255).astype(np.uint8))
    gray_png = tmp_path / "gray.png"
    cv2.imwrite(str(gray_png), np.full((20, 24), 100, np.uint8))
    gray_jpg = tmp_path / "gray.jpg"
    cv2.imwrite(str(gray_jpg), np.full((20, 24), 100, np.uint8))
    op_gray = _dicom(tmp_path, "op_gray.dcm", "OP", OP_8BIT, rgb=False)  # red-free photograph
    op_mod = _dicom(tmp_path, "op_mod.dcm", "OP", "1.2.840.10008.5.1.4.1.1.7", rgb=False)
    cr = _dicom(tmp_path, "cr.dcm", "CR", "1.2.840.10008.5.1.4.1.1.1", rgb=False)
    assert choose_model(rgb_png).model == RETINA_MODEL
    assert choose_model(rgb_jpg).model == RETINA_MODEL
    assert choose_model(gray_png).model == DEFAULT_MODEL
    assert choose_model(gray_jpg).model == DEFAULT_MODEL
    c = choose_model(op_gray)
    assert c.model == RETINA_MODEL and "Ophthalmic Photography 8 Bit" in c.reason
    assert choose_model(op_mod).model == RETINA_MODEL and "OP" in choose_model(op_mod).reason
    assert choose_model(cr).model == DEFAULT_MODEL and "CR" in choose_model(cr).reason
    assert choose_model(rgb_png, explicit="medsr-cxr-x4-fast").model == "medsr-cxr-x4-fast"
    assert choose_model(tmp_path / "missing.png").model == DEFAULT_MODEL  # unreadable: the reader reports it


def test_registry_entry_for_the_retina_model() -> None:
    from medsr.weights import MODELS, RETINA_MODEL, WeightsError, is_shipped, load_model
    from medsr.weights import registry as reg

    e = MODELS[RETINA_MODEL]
    assert e.packaged and e.scale == 2 and e.filename == "medsr-retina-x2.safetensors"
    assert reg.cached_path(e).parent == reg.packaged_dir()
    assert is_shipped(e), "medsr-retina-x2 ships (issue 21): pinned sha256 and size in the registry"
    lm = load_model(RETINA_MODEL)
    assert lm.sha256 == e.sha256 and reg.cached_path(e).stat().st_size == e.size and e.size < 8_000_000
    assert (lm.model.num_in_ch, lm.model.num_out_ch, lm.model.scale) == (3, 3, 2)
    assert lm.model.skip == "bicubic"  # output = bicubic + correction (recorded in the file's metadata)
    # a fidelity model: on a smooth colour image it stays within a few grey levels of bicubic, no colour cast
    import torch
    from torch.nn import functional as F

    x = torch.from_numpy(fundus(32, 40).transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        y = lm.model(x)
        bic = F.interpolate(x, scale_factor=2.0, mode="bicubic", align_corners=False)
    assert float((y - bic).abs().mean()) < 0.02
    assert float((y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs().max()) < 0.01
    with pytest.raises(WeightsError):  # a pinned file that does not match its hash is refused
        from medsr.weights.download import verify

        verify(reg.cached_path(e), e, "0" * 64)


def test_infer_without_model_never_runs_the_chest_model_on_a_fundus_photo(tmp_path: Path) -> None:
    from medsr.cli.infer import main
    from medsr.weights import MODELS, RETINA_MODEL, is_shipped

    src = tmp_path / "in"
    src.mkdir()
    write_rgb(src / "fundus.png", fundus(24, 28))
    cv2.imwrite(str(src / "cxr.png"), np.full((20, 24), 120, np.uint8))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(src), "-o", str(out), "--tile", "32", "--overlap", "8", "-q"])
    assert f"model {RETINA_MODEL} for {src / 'fundus.png'} (colour image" in r.output
    assert f"model medsr-cxr-x4 for {src / 'cxr.png'} (gray image" in r.output
    assert cv2.imread(str(out / "cxr.png"), cv2.IMREAD_UNCHANGED).shape == (80, 96)
    assert is_shipped(MODELS[RETINA_MODEL])
    assert r.exit_code == 0, r.output
    assert cv2.imread(str(out / "fundus.png")).shape == (48, 56, 3)


# ------------------------------------------------------------------------------------ OP DICOM


def _op_jpeg(h: int = 40, w: int = 48):
    """An Ophthalmic Photography 8 Bit instance: RGB, YBR_FULL_422, JPEG baseline (as fundus cameras write)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    px = np.round(fundus(h, w) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", px[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95,
                                                   cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422])
    assert ok
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = OP_8BIT
    ds.SOPClassUID = OP_8BIT
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OP"
    ds.PatientName, ds.PatientID = "FUNDUS^TEST", "PID-OP-1"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = "R"
    ds.PixelSpacing = [0.01, 0.01]
    ds.Rows, ds.Columns, ds.SamplesPerPixel = h, w, 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([buf.tobytes()])
    ds["PixelData"].VR = "OB"
    return ds, px


def test_ophthalmic_photography_dicom_round_trip(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from conftest import tiny_rrdb

    from medsr.api import Upscaler
    from medsr.io import read_image
    from medsr.runtime import TileConfig, TorchBackend
    from medsr.runtime.choice import choose_model

    ds, px = _op_jpeg()
    src = tmp_path / "op.dcm"
    ds.save_as(src, enforce_file_format=True)
    assert choose_model(src).model == "medsr-retina-x2"
    img = read_image(src)
    assert img.channels == 3 and img.photometric == "RGB" and img.pixels.dtype == np.uint8
    assert float(np.abs(img.pixels.astype(float) - px).mean()) < 4  # YBR 4:2:2 JPEG decoded to RGB

    up = Upscaler(TorchBackend(tiny_rrdb(2, 3), device="cpu"), TileConfig(tile=16, overlap=4), model_id="tiny-rgb-x2")
    dst = tmp_path / "out" / "op.dcm"
    up.upscale_file(src, dst)
    out = pydicom.dcmread(dst)
    assert (out.Rows, out.Columns, out.SamplesPerPixel) == (80, 96, 3)
    assert out.SOPClassUID == OP_8BIT and out.Modality == "OP"  # same IOD
    assert out.SOPInstanceUID != ds.SOPInstanceUID and out.SeriesInstanceUID != ds.SeriesInstanceUID
    assert out.StudyInstanceUID == ds.StudyInstanceUID and out.PatientID == ds.PatientID
    assert out.ImageType[0] == "DERIVED" and out.ImageLaterality == "R"
    assert [float(v) for v in out.PixelSpacing] == [0.005, 0.005]
    assert str(out.LossyImageCompression) == "01"  # the source was lossy: that history is kept
    assert out.SourceImageSequence[-1].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert "tiny-rgb-x2" in out.DerivationDescription
    back = read_image(dst)
    assert back.channels == 3 and back.pixels.shape == (80, 96, 3) and back.pixels.dtype == np.uint8
    expected = up(img.pixels)  # what the model makes of the decoded source: written losslessly
    np.testing.assert_array_equal(back.pixels, expected)
