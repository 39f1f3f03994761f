"""Derived DICOM a PACS can trust (issue 12): identity, encoding, provenance, time, geometry,
multi-frame, Part 10, overlays/icons/padding/private tags. Synthetic datasets only (fast)."""

from __future__ import annotations

import copy
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from conftest import SECRET_ID, SECRET_NAME, make_cr, tiny_rrdb  # noqa: E402
from pydicom.dataset import Dataset, FileDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless  # noqa: E402

from medsr.api import Upscaler  # noqa: E402
from medsr.io import ImageReadError, make_output, read_image, write_image  # noqa: E402
from medsr.io.dicom import image_from_dataset  # noqa: E402
from medsr.io.dicom_derive import (  # noqa: E402
    IMPLEMENTATION_CLASS_UID,
    derive_dicom,
    derive_frames,
    derived_uids,
    parse_syntax,
)

SHA_A, SHA_B = "a" * 64, "b" * 64
UTC = UTC


def nearest(a: np.ndarray, s: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(a, s, 0), s, 1)


def code(item: Dataset) -> tuple[str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator)


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------- 1. identity


def test_uids_follow_the_weights_not_the_name() -> None:
    src = make_cr()
    px = nearest(src.pixel_array)
    a = derive_dicom(src, px, 2, "my-sr-model", weights_sha256=SHA_A)
    b = derive_dicom(src, px, 2, "my-sr-model", weights_sha256=SHA_B)  # same name, other weights
    a2 = derive_dicom(src, px, 2, "renamed", weights_sha256=SHA_A)  # same weights, other name
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (a2.SOPInstanceUID, a2.SeriesInstanceUID)
    assert derived_uids(src, "m", 2, weights_sha256=SHA_A)[0] != derived_uids(src, "m", 4, weights_sha256=SHA_A)[0]
    # a lossless syntax is the same instance; a lossy one changes the pixels, hence the instance
    rle = derive_dicom(src, px, 2, "m", weights_sha256=SHA_A, syntax="rle")
    lossy = derive_dicom(src, px, 2, "m", weights_sha256=SHA_A, syntax="jpeg2000-lossy:5")
    assert rle.SOPInstanceUID == a.SOPInstanceUID != lossy.SOPInstanceUID
    with pytest.raises(ValueError, match="64 hex"):
        derive_dicom(src, px, 2, "m", weights_sha256="not-a-hash")


def test_two_weight_files_with_one_name_give_different_uids(tmp_path: Path) -> None:
    from medsr.weights.load import save_weights

    src = make_cr(h=16, w=16)
    outs = []
    paths = [tmp_path / d / "my-sr-model.pth" for d in ("one", "two", "again")]
    digests = [save_weights(tiny_rrdb(2, 1, seed=seed), p, model_id="my-sr-model") for seed, p in zip((1, 2), paths[:2], strict=True)]
    shutil.copytree(paths[0].parent, paths[2].parent)  # the same file again, elsewhere
    for path, digest in zip(paths, [*digests, digests[0]], strict=True):
        up = Upscaler.from_pretrained(path, device="cpu", tile=16, overlap=4)
        assert up.model_id == "my-sr-model" and up.weights_sha256 == digest
        outs.append(up.upscale_dicom(src))
    assert outs[0].SOPInstanceUID != outs[1].SOPInstanceUID  # different pixels, different instances
    assert outs[0].SOPInstanceUID == outs[2].SOPInstanceUID  # same weights again: idempotent re-send
    assert outs[0].SeriesInstanceUID == outs[2].SeriesInstanceUID


def test_engine_weights_hash_is_the_recorded_one(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    import hashlib

    from medsr.export import export_onnx

    m = tiny_rrdb(2, 1, seed=1)
    export_onnx(m, tmp_path / "rec.onnx", model_id="x", weights_sha256=SHA_B)
    export_onnx(m, tmp_path / "bare.onnx", model_id="x", weights_sha256="")
    assert Upscaler.from_engine(tmp_path / "rec.onnx", device="cpu").weights_sha256 == SHA_B  # from the metadata
    bare = tmp_path / "bare.onnx"  # nothing recorded: the engine file's own hash (same file, same pixels)
    assert Upscaler.from_engine(bare, device="cpu").weights_sha256 == hashlib.sha256(bare.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- 2. encoding


@pytest.mark.parametrize("syntax,uid", [(None, JPEG2000Lossless), ("rle", RLELossless), ("explicit-le", ExplicitVRLittleEndian)])
@pytest.mark.parametrize("kind", ["mono1-12bit", "signed-12bit", "rgb-8bit", "full-16bit"])
def test_lossless_output_round_trips_bit_exactly(tmp_path: Path, syntax: str | None, uid: str, kind: str) -> None:
    if kind == "mono1-12bit":
        ds = make_cr("MONOCHROME1", h=20, w=18)
    elif kind == "signed-12bit":
        ds = make_cr(signed=True, h=20, w=18)
    elif kind == "full-16bit":
        ds = make_cr(bits_stored=16, h=20, w=18)
    else:
        ds = make_cr(h=20, w=18)
        rgb = np.random.default_rng(5).integers(0, 256, size=(20, 18, 3), dtype=np.uint8)
        ds.set_pixel_data(rgb, "RGB", 8, generate_instance_uid=False)
    img = read_image(save(ds, tmp_path / "in.dcm"))
    px = np.random.default_rng(1).integers(*img.value_range, size=(40, 36) + img.pixels.shape[2:], endpoint=True)
    out = make_output(img, px.astype(img.dtype), 2, "m", weights_sha256=SHA_A, dicom_syntax=syntax)
    back = pydicom.dcmread(write_image(out, tmp_path / "out.dcm"))
    assert back.file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(back.pixel_array, px)
    if kind == "rgb-8bit":  # colour in JPEG 2000 is written with the reversible component transform
        assert back.PhotometricInterpretation == ("YBR_RCT" if uid == JPEG2000Lossless else "RGB")
    assert "LossyImageCompression" not in back or kind != "rgb-8bit" or back.LossyImageCompression == "01"


def test_compressed_is_smaller_and_default_falls_back_to_rle_for_tiny_images() -> None:
    ds = make_cr(h=64, w=64)
    smooth = (np.add.outer(np.arange(128), np.arange(128)) * 15).astype(np.uint16)
    j2k = derive_dicom(ds, smooth, 2, "m", weights_sha256=SHA_A)
    raw = derive_dicom(ds, smooth, 2, "m", weights_sha256=SHA_A, syntax="explicit-le")
    assert len(j2k.PixelData) * 4 < len(raw.PixelData)
    tiny = make_cr(h=8, w=8)
    out = derive_dicom(tiny, nearest(tiny.pixel_array), 2, "m")  # 16 x 16: below OpenJPEG's minimum
    assert out.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(out.pixel_array, nearest(tiny.pixel_array))
    with pytest.raises(ValueError, match="cannot encode the DICOM output as jpeg2000-lossless .*32 x 32"):
        derive_dicom(tiny, nearest(tiny.pixel_array), 2, "m", syntax="jpeg2000-lossless")


def test_lossy_only_when_asked_and_then_marked() -> None:
    ds = make_cr(h=32, w=32)
    del ds.LossyImageCompression, ds.LossyImageCompressionRatio, ds.LossyImageCompressionMethod
    px = nearest(ds.pixel_array)
    lossless = derive_dicom(ds, px, 2, "m")
    assert "LossyImageCompression" not in lossless
    assert all(code(i) != ("113040", "DCM") for i in lossless.DerivationCodeSequence)
    lossy = derive_dicom(ds, px, 2, "m", syntax="jpeg2000-lossy:8")
    assert lossy.file_meta.TransferSyntaxUID == JPEG2000
    assert lossy.LossyImageCompression == "01" and lossy.LossyImageCompressionMethod == "ISO_15444_1"
    assert float(lossy.LossyImageCompressionRatio) > 4
    assert ("113040", "DCM") in [code(i) for i in lossy.DerivationCodeSequence]
    assert np.abs(lossy.pixel_array.astype(int) - px).max() > 0  # it is lossy
    src_lossy = make_cr(h=32, w=32)  # already lossy (ratio 10, ISO_15444_1): history appended
    again = derive_dicom(src_lossy, px, 2, "m", syntax="jpeg2000-lossy")
    assert list(again.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_15444_1"]
    assert len(again.LossyImageCompressionRatio) == 2 and again.LossyImageCompressionRatio[0] == 10


@pytest.mark.parametrize("bad", ["png", "jpeg2000-lossy:abc", "jpeg2000-lossy:0.5", "rle:3"])
def test_bad_syntax_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="syntax|ratio|takes no"):
        parse_syntax(bad)
    assert parse_syntax("J2K").name == "jpeg2000-lossless" and parse_syntax("uncompressed").uid == ExplicitVRLittleEndian


def test_cli_rejects_a_bad_syntax_before_loading_anything(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from medsr.cli.infer import main

    f = save(make_cr(), tmp_path / "a.dcm")
    r = CliRunner().invoke(main, [str(f), "-o", str(tmp_path / "o"), "--dicom-syntax", "webp"])
    assert r.exit_code == 2 and "unknown DICOM output syntax 'webp'" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------- 3. provenance


def test_provenance_is_extended_not_replaced() -> None:
    import medsr

    ds = make_cr()
    old_ref = Dataset()
    old_ref.ReferencedSOPClassUID = ds.SOPClassUID
    old_ref.ReferencedSOPInstanceUID = "1.2.3.4"
    old_ref.PurposeOfReferenceCodeSequence = Sequence([_item("121320", "Uncompressed predecessor")])
    ds.SourceImageSequence = Sequence([old_ref])
    ds.DerivationCodeSequence = Sequence([_item("113040", "Lossy Compression")])
    ds.DerivationDescription = "lossy compressed by the modality"
    eq = Dataset()
    eq.Manufacturer = "PACS vendor"
    eq.PurposeOfReferenceCodeSequence = Sequence([_item("109102", "Processing Equipment")])
    ds.ContributingEquipmentSequence = Sequence([eq])
    ds.InstanceCreatorUID = "1.2.3.999"
    out = derive_dicom(ds, nearest(ds.pixel_array), 2, "cxr-x2", weights_sha256=SHA_A)
    assert [str(i.ReferencedSOPInstanceUID) for i in out.SourceImageSequence] == ["1.2.3.4", ds.SOPInstanceUID]
    assert code(out.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0]) == ("121320", "DCM")
    assert code(out.SourceImageSequence[1].PurposeOfReferenceCodeSequence[0]) == ("121322", "DCM")
    assert [code(i) for i in out.DerivationCodeSequence] == [("113040", "DCM"), ("113085", "DCM")]
    assert out.DerivationDescription.startswith("lossy compressed by the modality; Super-resolution x2")
    assert [e.Manufacturer for e in out.ContributingEquipmentSequence] == ["PACS vendor", "medsr"]
    ours = out.ContributingEquipmentSequence[1]
    assert code(ours.PurposeOfReferenceCodeSequence[0]) == ("109103", "DCM")
    assert ours.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Modifying Equipment"
    assert list(ours.SoftwareVersions) == [f"medsr {medsr.__version__}", "cxr-x2"]
    assert "cxr-x2" in ours.ContributionDescription and SHA_A in ours.ContributionDescription
    assert SHA_A in out.DerivationDescription
    assert out.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert out.file_meta.ImplementationVersionName == f"MEDSR_{medsr.__version__}"
    assert "InstanceCreatorUID" not in out


def _item(value: str, meaning: str) -> Dataset:
    d = Dataset()
    d.CodeValue, d.CodingSchemeDesignator, d.CodeMeaning = value, "DCM", meaning
    return d


# ------------------------------------------------------------------------------- 4. time, series


def test_times_follow_the_source_timezone_offset() -> None:
    ds = make_cr()
    ds.TimezoneOffsetFromUTC = "+0900"
    now = datetime(2025, 1, 2, 20, 4, 5, tzinfo=UTC)
    out = derive_dicom(ds, nearest(ds.pixel_array), 2, "m", now=now)
    assert out.TimezoneOffsetFromUTC == "+0900"
    for d, t in (("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime"),
                 ("SeriesDate", "SeriesTime")):
        assert getattr(out, d) == "20250103" and getattr(out, t).startswith("050405"), d
    assert out.ContributingEquipmentSequence[-1].ContributionDateTime.endswith("+0900")
    ds.TimezoneOffsetFromUTC = "-0500"
    out = derive_dicom(ds, nearest(ds.pixel_array), 2, "m", now=now)
    assert (out.ContentDate, out.ContentTime[:6]) == ("20250102", "150405")
    del ds.TimezoneOffsetFromUTC  # no offset: host local time, and no offset is invented
    out = derive_dicom(ds, nearest(ds.pixel_array), 2, "m", now=datetime(2025, 1, 2, 3, 4, 5))
    assert "TimezoneOffsetFromUTC" not in out and out.SeriesTime.startswith("030405")


def test_series_number_and_description_rules() -> None:
    ds = make_cr()
    ds.SeriesNumber = 3
    out = derive_dicom(ds, nearest(ds.pixel_array), 4 // 2, "m")
    assert out.SeriesNumber == 1003 and out.SeriesDescription == "CHEST PA [SR x2]"
    del ds.SeriesNumber, ds.SeriesDescription
    out = derive_dicom(ds, nearest(ds.pixel_array), 2, "m")
    assert out.SeriesNumber == 1000 and out.SeriesDescription == "Super-resolution [SR x2]"
    ds.SeriesDescription = "X" * 64
    assert len(derive_dicom(ds, nearest(ds.pixel_array), 2, "m").SeriesDescription) == 64


# ------------------------------------------------------------------------------- 5. geometry


def _cross_sectional(iop: list[float], h: int = 16, w: int = 16) -> Dataset:
    ds = make_cr(h=h, w=w)
    ds.ImagePositionPatient = [10.0, -20.0, 30.0]
    ds.ImageOrientationPatient = iop
    ds.PixelSpacing = [0.8, 0.5]  # row spacing (down), column spacing (across)
    ds.FrameOfReferenceUID = "1.2.3.4.5"
    return ds


def _patient_point(ds: Dataset, r: float, c: float) -> np.ndarray:
    """Patient coordinates of (row r, column c) in index space (pixel centres at integers)."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = [float(v) for v in ds.ImageOrientationPatient]
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return ipp + c * dc * np.array(iop[:3]) + r * dr * np.array(iop[3:])


@pytest.mark.parametrize("scale", [2, 4])
def test_image_position_moves_to_the_first_hr_pixel_centre(scale: int) -> None:
    iop = [0.8, 0.6, 0.0, 0.0, 0.0, -1.0]  # oblique
    ds = _cross_sectional(iop)
    out = derive_dicom(ds, nearest(ds.pixel_array, scale), scale, "m")
    assert out.FrameOfReferenceUID == ds.FrameOfReferenceUID
    # half-pixel convention: LR index x <-> HR index (x + 0.5) * s - 0.5, for any point
    for r, c in ((0, 0), (3.25, 7.5), (15, 15)):
        lr_point = _patient_point(ds, r, c)
        hr_point = _patient_point(out, (r + 0.5) * scale - 0.5, (c + 0.5) * scale - 0.5)
        np.testing.assert_allclose(hr_point, lr_point, atol=1e-4)
    # the outer edges of the image stay where they were
    np.testing.assert_allclose(_patient_point(out, -0.5, -0.5), _patient_point(ds, -0.5, -0.5), atol=1e-4)


def test_frame_of_reference_replaced_when_position_cannot_be_recomputed(caplog: pytest.LogCaptureFixture) -> None:
    ds = _cross_sectional([1, 0, 0, 0, 1, 0])
    del ds.ImageOrientationPatient
    with caplog.at_level(logging.WARNING):
        out = derive_dicom(ds, nearest(ds.pixel_array), 2, "m", weights_sha256=SHA_A)
    assert out.FrameOfReferenceUID != ds.FrameOfReferenceUID and pydicom.uid.UID(out.FrameOfReferenceUID).is_valid
    assert "new FrameOfReferenceUID" in caplog.text
    assert out.FrameOfReferenceUID == derive_dicom(ds, nearest(ds.pixel_array), 2, "m", weights_sha256=SHA_A).FrameOfReferenceUID


def test_zero_pixel_spacing_stays_zero_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    ds = make_cr()
    ds.PixelSpacing = ["0", "0"]
    ds.ImagerPixelSpacing = ["1", "1", "1"]  # not a pair
    with caplog.at_level(logging.WARNING):
        out = derive_dicom(ds, nearest(ds.pixel_array), 2, "m")
    assert [float(v) for v in out.PixelSpacing] == [0.0, 0.0]
    assert "PixelSpacing is zero in the source; kept zero" in caplog.text
    assert "ImagerPixelSpacing" not in out and "ImagerPixelSpacing is not a pair of numbers" in caplog.text


def test_collimator_functional_groups_and_ultrasound_regions_are_scaled() -> None:
    ds = make_cr()
    ds.CollimatorShape = "RECTANGULAR"
    ds.CollimatorLeftVerticalEdge, ds.CollimatorRightVerticalEdge = 3, 14
    ds.CollimatorUpperHorizontalEdge, ds.CollimatorLowerHorizontalEdge = 1, 20
    ds.CenterOfCircularCollimator, ds.RadiusOfCircularCollimator = [10, 8], 5
    pm = Dataset()
    pm.PixelSpacing = [0.4, 0.4]
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    pm2 = Dataset()
    pm2.PixelSpacing = [0.6, 0.2]
    frame = Dataset()
    frame.PixelMeasuresSequence = Sequence([pm2])
    ft = Dataset()
    ft.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    frame.MRImageFrameTypeSequence = Sequence([ft])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    region = Dataset()
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 2, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 13, 19
    region.PhysicalDeltaX, region.PhysicalDeltaY = 0.1, 0.2
    ds.SequenceOfUltrasoundRegions = Sequence([region])
    out = derive_dicom(ds, nearest(ds.pixel_array, 4), 4, "m")
    assert (out.CollimatorLeftVerticalEdge, out.CollimatorRightVerticalEdge) == (9, 56)
    assert (out.CollimatorUpperHorizontalEdge, out.CollimatorLowerHorizontalEdge) == (1, 80)
    assert list(out.CenterOfCircularCollimator) == [39, 31] and out.RadiusOfCircularCollimator == 20
    assert [float(v) for v in out.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [0.1, 0.1]
    assert [float(v) for v in out.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [0.15, 0.05]
    assert list(out.PerFrameFunctionalGroupsSequence[0].MRImageFrameTypeSequence[0].FrameType)[:2] == ["DERIVED", "SECONDARY"]
    r = out.SequenceOfUltrasoundRegions[0]
    assert (r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1) == (8, 0, 55, 79)
    assert (r.PhysicalDeltaX, r.PhysicalDeltaY) == pytest.approx((0.025, 0.05))


def test_grid_convention_matches_the_runtime(tmp_path: Path) -> None:
    """The shipped x4 model, run by the tiled runtime, puts a blob where the half-pixel convention
    (LR index x -> HR index 4x + 1.5) says, not where corner alignment (4x) would: the patient
    position of the blob is the same in the source and in the derived header."""

    up = Upscaler.from_pretrained("medsr-cxr-x4-fast", device="cpu", tile=48, overlap=8)
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float64)
    cy, cx = 17.3, 21.6
    lr = 0.2 + 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.5**2))
    hr = up(lr.astype(np.float32)).astype(np.float64)
    w = np.clip(hr - 0.2, 0, None)
    w[w < 0.05] = 0
    gy, gx = np.mgrid[0 : hr.shape[0], 0 : hr.shape[1]]
    hy, hx = (w * gy).sum() / w.sum(), (w * gx).sum() / w.sum()
    assert abs(hy - (4 * cy + 1.5)) < 0.3 and abs(hx - (4 * cx + 1.5)) < 0.3, (hy, hx)
    ds = _cross_sectional([0, 1, 0, 0, 0, -1], h=40, w=40)
    out = derive_dicom(ds, nearest(ds.pixel_array, 4), 4, "m")
    np.testing.assert_allclose(_patient_point(out, hy, hx), _patient_point(ds, cy, cx), atol=0.3 * 0.8 / 4 * 2)


# ------------------------------------------------------------------------------- 6. multi-frame


def _multiframe(n: int = 3, h: int = 20, w: int = 18) -> Dataset:
    ds = make_cr(h=h, w=w)
    frames = np.random.default_rng(9).integers(0, 4096, size=(n, h, w), dtype=np.uint16)
    ds.set_pixel_data(frames, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # MF grayscale word SC
    pms = []
    for i in range(n):
        fg, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, float(i)]
        fg.PlanePositionSequence = Sequence([pos])
        pms.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(pms)
    shared, pm, po = Dataset(), Dataset(), Dataset()
    pm.PixelSpacing = [0.5, 0.5]
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([pm]), Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    return ds


def test_multiframe_is_upscaled_frame_by_frame_into_one_instance(tmp_path: Path) -> None:
    from medsr.runtime import TileConfig, TorchBackend

    src = _multiframe()
    img = read_image(save(src, tmp_path / "mf.dcm"))
    assert img.frames == 3 and img.pixels.shape == (20, 18)  # only the first frame is decoded up front
    up = Upscaler(TorchBackend(tiny_rrdb(2, 1), device="cpu"), TileConfig(tile=16, overlap=4, batch=2),
                  model_id="tiny", weights_sha256=SHA_A)
    out = up.upscale_image(img)
    back = pydicom.dcmread(write_image(out, tmp_path / "mf_x2.dcm"))
    assert back.NumberOfFrames == 3 and back.file_meta.TransferSyntaxUID == JPEG2000Lossless
    arr = back.pixel_array
    assert arr.shape == (3, 40, 36)
    for i in range(3):  # each frame is exactly what the single-frame path gives for that frame
        single = copy.deepcopy(src)
        single.set_pixel_data(src.pixel_array[i], "MONOCHROME2", 12, generate_instance_uid=False)
        np.testing.assert_array_equal(arr[i], up.upscale_image(image_from_dataset(single)).pixels)
    assert [float(v) for v in back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [0.25, 0.25]
    assert [float(v) for v in back.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0].ImagePositionPatient] == [
        -0.125, -0.125, 2.0]


def test_multiframe_holds_one_frame_at_a_time() -> None:
    src = _multiframe(n=4)
    img = image_from_dataset(src)
    seen: list[tuple[int, ...]] = []

    def fake_upscale(frame_img):
        assert frame_img.frames == 1
        seen.append(frame_img.pixels.shape)
        return nearest(frame_img.pixels)

    out = derive_frames(img, fake_upscale, 2, "m", syntax="rle")
    assert seen == [(20, 18)] * 4 and out.frames == 4
    one = _multiframe(n=1)  # a multi-frame IOD with one frame keeps NumberOfFrames (Type 1 there)
    assert derive_dicom(one, nearest(one.pixel_array), 2, "m").NumberOfFrames == 1
    np.testing.assert_array_equal(out.dataset.pixel_array, nearest(src.pixel_array.transpose(1, 2, 0)).transpose(2, 0, 1))
    with pytest.raises(ValueError, match="frame 0: upscaled frame is"):
        derive_frames(img, lambda f: f.pixels, 2, "m")


def test_multiframe_corrupt_frame_is_named(tmp_path: Path) -> None:
    ds = _multiframe(n=2)
    ds.compress(RLELossless, generate_instance_uid=False)
    from pydicom.encaps import encapsulate, generate_frames

    frames = list(generate_frames(ds.PixelData, number_of_frames=2))
    ds.PixelData = encapsulate([frames[0], b"\x01\x00\x00\x00" + b"\0" * 60])
    img = read_image(save(ds, tmp_path / "bad.dcm"))
    with pytest.raises(ImageReadError, match=r"bad.dcm: cannot decode DICOM pixel data frame 2"):
        derive_frames(img, lambda f: nearest(f.pixels), 2, "m")


# ------------------------------------------------------------------------------- 7. Part 10


def test_upscale_dicom_returns_a_part10_file_dataset(tmp_path: Path) -> None:
    from medsr.api import Upscaler
    from medsr.runtime import TileConfig, TorchBackend

    up = Upscaler(TorchBackend(tiny_rrdb(2, 1), device="cpu"), TileConfig(tile=16, overlap=4), model_id="t")
    out = up.upscale_dicom(make_cr(), dicom_syntax="rle")
    assert isinstance(out, FileDataset)
    out.save_as(tmp_path / "plain.dcm")  # no enforce_file_format: still Part 10
    raw = (tmp_path / "plain.dcm").read_bytes()
    assert raw[128:132] == b"DICM"
    back = pydicom.dcmread(tmp_path / "plain.dcm")
    assert back.file_meta.TransferSyntaxUID == RLELossless and back.SOPInstanceUID == out.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, out.pixel_array)


def test_changed_pixels_are_re_encoded_on_write(tmp_path: Path) -> None:
    img = image_from_dataset(make_cr())
    out = make_output(img, nearest(img.pixels), 2, "m")
    out.pixels = out.pixels.copy()
    out.pixels[:5] = 7
    back = pydicom.dcmread(write_image(out, tmp_path / "o.dcm"))
    assert back.file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(back.pixel_array, out.pixels)


# ------------------------------------------------------------------------- 8. overlays & co.


def test_overlay_is_scaled_icon_dropped_private_tags_dropped() -> None:
    ds = make_cr(h=20, w=16)
    bits = np.zeros((10, 8), np.uint8)
    bits[2:5, 3] = 1
    ds.add_new(0x60000010, "US", 10)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [3, 2])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", np.packbits(bits.ravel(), bitorder="little").tobytes())
    ds.add_new(0x60020010, "US", 10)  # embedded overlay (no OverlayData): cannot survive resampling
    icon = Dataset()
    icon.Rows = 1
    ds.IconImageSequence = Sequence([icon])
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "vendor geometry")
    nested = Dataset()
    nested.private_block(0x0031, "ACME 1.0", create=True).add_new(0x01, "LO", "x")
    ds.ReferencedImageSequence = Sequence([nested])
    ds.PixelPaddingValue = 0
    out = derive_dicom(ds, nearest(ds.pixel_array, 3), 3, "m")
    assert (out[0x60000010].value, out[0x60000011].value) == (30, 24)
    assert list(out[0x60000050].value) == [7, 4]
    plane = np.unpackbits(np.frombuffer(out[0x60003000].value, np.uint8), bitorder="little")[: 30 * 24].reshape(30, 24)
    np.testing.assert_array_equal(plane, nearest(bits, 3))
    assert 0x60020010 not in out and "IconImageSequence" not in out
    assert not any(e.tag.is_private for e in out) and not any(e.tag.is_private for e in out.ReferencedImageSequence[0])
    assert out.PixelPaddingValue == 0


def test_pixel_padding_is_restored_exactly() -> None:
    ds = make_cr(h=16, w=16)
    px = ds.pixel_array.copy()
    px = np.maximum(px, 50)
    px[:, :4] = 0  # padding stripe
    ds.set_pixel_data(px, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.PixelPaddingValue = 0
    img = image_from_dataset(ds)
    blurred = nearest(px).astype(np.int32)
    blurred[:, 6:10] += 3  # a model smears the stripe's edge
    blurred = np.clip(blurred, 0, 4095).astype(np.uint16)
    blurred[:, :8] = 2  # ... and does not reproduce the padding value exactly
    out = make_output(img, blurred, 2, "m")
    assert (out.pixels[:, :8] == 0).all() and out.dataset.PixelPaddingValue == 0
    np.testing.assert_array_equal(out.dataset.pixel_array, out.pixels)
    ds.PixelPaddingRangeLimit = 10  # a range of padding values
    px[:, 4] = 9
    ds.set_pixel_data(px, "MONOCHROME2", 12, generate_instance_uid=False)
    out = make_output(image_from_dataset(ds), nearest(px) + 1, 2, "m")
    assert (out.pixels[:, :10] == 0).all() and (out.pixels[:, 10:] > 0).all()


def test_patient_data_never_logged_on_the_new_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = _cross_sectional([1, 0, 0, 0, 1, 0])
    ds.PixelSpacing = [0, 0]
    ds.TimezoneOffsetFromUTC = "SECRET"
    with caplog.at_level(logging.DEBUG):
        out = derive_dicom(ds, nearest(ds.pixel_array), 2, "m")
        img = derive_frames(image_from_dataset(_multiframe()), lambda f: nearest(f.pixels), 2, "m")
        write_image(img, tmp_path / "mf.dcm")
    text = caplog.text + repr(img) + str(img.meta)
    assert "new FrameOfReferenceUID" in text and out.PatientName == SECRET_NAME
    for secret in ("SECRET", SECRET_ID, "19700101", "ACC-SECRET"):
        assert secret not in text
