"""DICOM reading and the derived output dataset, on synthetic CR datasets built with pydicom."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from conftest import SECRET_ID, SECRET_NAME, make_cr  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from medsr.io import (  # noqa: E402
    ImageReadError,
    derive_dicom,
    float_to_stored,
    make_output,
    read_image,
    to_float,
    write_image,
)


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def upscaled(img, scale: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(img.pixels, scale, 0), scale, 1)


@pytest.fixture(params=["MONOCHROME2", "MONOCHROME1"])
def cr(request, tmp_path):
    return read_image(save(make_cr(request.param), tmp_path / "cr.dcm"))


# -------------------------------------------------------------------------------------------- read


def test_read_cr_12bit(cr):
    assert cr.format == "dicom" and cr.dtype == np.uint16
    assert cr.max_value == 4095 and cr.meta["bits_stored"] == 12
    assert cr.photometric in ("MONOCHROME1", "MONOCHROME2")
    assert cr.meta["rescale"] == (2.0, -1024.0)
    assert cr.pixels.max() == 4095


def test_no_suffix_and_no_preamble(tmp_path):
    ds = make_cr()
    save(ds, tmp_path / "IM0001")
    assert read_image(tmp_path / "IM0001").format == "dicom"
    ds.save_as(tmp_path / "raw.dcm", enforce_file_format=False)  # no preamble / no DICM magic
    data = (tmp_path / "raw.dcm").read_bytes()
    assert data[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(tmp_path / "raw.dcm").pixels, ds.pixel_array)


def test_rle_compressed_decodes(tmp_path):
    from pydicom.uid import RLELossless

    ds = make_cr()
    ref = ds.pixel_array.copy()
    ds.compress(RLELossless, generate_instance_uid=False)
    img = read_image(save(ds, tmp_path / "rle.dcm"))
    np.testing.assert_array_equal(img.pixels, ref)


def test_monochrome1_polarity(tmp_path):
    m1 = read_image(save(make_cr("MONOCHROME1"), tmp_path / "m1.dcm"))
    m2 = read_image(save(make_cr("MONOCHROME2"), tmp_path / "m2.dcm"))
    np.testing.assert_array_equal(m1.pixels, m2.pixels)  # same stored values ...
    f1, f2 = to_float(m1), to_float(m2)
    np.testing.assert_allclose(f1, 1.0 - f2, atol=1e-6)  # ... opposite meaning: model sees MONOCHROME2
    np.testing.assert_array_equal(float_to_stored(f1, m1), m1.pixels)  # re-inverted
    out = make_output(m1, upscaled(m1), 2, "m")
    assert out.photometric == "MONOCHROME1" and out.dataset.PhotometricInterpretation == "MONOCHROME1"


def test_signed_pixel_representation(tmp_path):
    img = read_image(save(make_cr(bits_stored=12, signed=True), tmp_path / "s.dcm"))
    assert img.dtype == np.int16 and img.signed and img.max_value == 4095
    f = to_float(img)
    assert f.min() >= 0 and f.max() <= 1
    np.testing.assert_allclose(f[..., 0], (img.pixels + 2048) / 4095, atol=1e-6)
    np.testing.assert_array_equal(float_to_stored(f, img), img.pixels)
    stored = float_to_stored(np.array([[[-1.0], [2.0]]], np.float32), img)
    assert stored.tolist() == [[-2048, 2047]]
    out = make_output(img, upscaled(img), 2, "m")
    back = read_image(write_image(out, img.path.with_name("s_x2.dcm")))
    assert back.dataset.PixelRepresentation == 1
    np.testing.assert_array_equal(back.pixels, upscaled(img))


# ----------------------------------------------------------------------------------------- derive


def test_derived_attributes(cr):
    src = cr.dataset
    ds = derive_dicom(src, upscaled(cr, 2), 2, "realesrgan-x2@abc")
    assert ds.SOPInstanceUID != src.SOPInstanceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless  # lossless compressed by default
    np.testing.assert_array_equal(ds.pixel_array, upscaled(cr, 2))
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.SOPClassUID == src.SOPClassUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (ds.Rows, ds.Columns) == (src.Rows * 2, src.Columns * 2)
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.1, 0.075])
    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx([0.0715, 0.0715])
    assert "realesrgan-x2@abc" in ds.DerivationDescription and "x2" in ds.DerivationDescription
    code = ds.DerivationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "113085",
        "DCM",
        "Spatial resampling",
    )
    ref = ds.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == src.SOPClassUID
    purpose = ref.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    assert ref.SpatialLocationsPreserved == "NO"
    assert ds.BitsStored == 12 and ds.BitsAllocated == 16 and ds.HighBit == 11 and ds.PixelRepresentation == 0
    assert ds.PhotometricInterpretation == src.PhotometricInterpretation
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionRatio == src.LossyImageCompressionRatio
    assert ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert ds.BurnedInAnnotation == "YES"
    assert (ds.WindowCenter, ds.WindowWidth) == (src.WindowCenter, src.WindowWidth)
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (src.RescaleSlope, src.RescaleIntercept)
    assert ds.PatientName == SECRET_NAME and ds.PatientID == SECRET_ID and ds.PatientBirthDate == "19700101"
    assert ds.AccessionNumber == src.AccessionNumber and ds.StudyDate == src.StudyDate
    assert "SmallestImagePixelValue" not in ds  # no longer true after resampling
    assert ds.SeriesDescription.endswith("[SR x2]")
    assert src.Rows == 20 and list(src.ImageType)[0] == "ORIGINAL"  # source untouched


def test_uids_deterministic(cr):
    px = upscaled(cr, 2)
    a = derive_dicom(cr.dataset, px, 2, "model-a")
    b = derive_dicom(cr.dataset, px, 2, "model-a")
    c = derive_dicom(cr.dataset, px, 2, "model-b")
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != c.SOPInstanceUID and a.SeriesInstanceUID != c.SeriesInstanceUID
    assert a.SOPInstanceUID != a.SeriesInstanceUID
    for uid in (a.SOPInstanceUID, a.SeriesInstanceUID):
        assert len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    other = read_image(save(make_cr(seed=7), cr.path.with_name("other.dcm")))
    d = derive_dicom(other.dataset, upscaled(other, 2), 2, "model-a")
    assert d.SOPInstanceUID != a.SOPInstanceUID and d.SeriesInstanceUID != a.SeriesInstanceUID


def test_values_clipped_to_bits_stored(cr):
    px = upscaled(cr, 2)
    px[0, :4] = 65535
    ds = derive_dicom(cr.dataset, px, 2, "m")
    assert ds.pixel_array.max() == 4095
    f = np.full((2, px.shape[1], 1), 1.5, np.float32)
    assert float_to_stored(f, cr).max() == (4095 if cr.photometric == "MONOCHROME2" else 0)


def test_lossy_transfer_syntax_marks_lossy():
    ds = make_cr()
    del ds.LossyImageCompression, ds.LossyImageCompressionRatio, ds.LossyImageCompressionMethod
    px = np.repeat(np.repeat(ds.pixel_array, 2, 0), 2, 1)
    assert "LossyImageCompression" not in derive_dicom(ds, px, 2, "m")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit  # as if read from a JPEG file
    out = derive_dicom(ds, px, 2, "m")
    assert out.LossyImageCompression == "01" and out.LossyImageCompressionMethod == "ISO_10918_1"


def test_write_and_read_back(cr, tmp_path):
    px = upscaled(cr, 2)
    out = make_output(cr, px, 2, "m")
    path = write_image(out, tmp_path / "out.dcm")
    back = pydicom.dcmread(path)
    assert back.preamble is not None and back.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert back.SOPInstanceUID == out.dataset.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, px)
    again = read_image(path)
    assert again.max_value == 4095 and again.photometric == cr.photometric
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------ errors/privacy


def test_no_pixel_data(tmp_path):
    ds = make_cr()
    del ds.PixelData
    path = save(ds, tmp_path / "nopix.dcm")
    with pytest.raises(ImageReadError) as ei:
        read_image(path)
    assert str(path) in str(ei.value) and "no pixel data" in str(ei.value)
    assert "SECRET" not in str(ei.value)


def test_garbage_dcm(tmp_path, rng):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(200))
    with pytest.raises(ImageReadError, match="bad.dcm"):
        read_image(bad)
    noise = tmp_path / "noise"
    noise.write_bytes(rng.bytes(500))
    with pytest.raises(ImageReadError, match="noise"):
        read_image(noise)


def test_short_pixel_data(tmp_path):
    ds = make_cr()
    ds.PixelData = ds.PixelData[:100]
    path = save(ds, tmp_path / "short.dcm")
    with pytest.raises(ImageReadError, match="pixel data is truncated: 100 bytes, expected") as ei:
        read_image(path)
    assert str(path) in str(ei.value) and "SECRET" not in str(ei.value)


def test_patient_data_never_logged(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        img = read_image(save(make_cr("MONOCHROME1"), tmp_path / "p.dcm"))
        out = make_output(img, upscaled(img), 2, "m")
        write_image(out, tmp_path / "p_x2.dcm")
        with pytest.raises(Exception) as ei:
            write_image(out, tmp_path / "p_x2.png")
        bad = make_cr()
        del bad.PixelData
        with pytest.raises(ImageReadError) as ej:
            read_image(save(bad, tmp_path / "q.dcm"))
    text = caplog.text + str(ei.value) + str(ej.value) + repr(img) + repr(out) + str(img.meta) + str(out.meta)
    for secret in ("SECRETSURNAME", SECRET_ID, "19700101", "ACC-SECRET"):
        assert secret not in text


# ------------------------------------------------------------------------------------- shared data


def test_shared_j2k_decodes(shared_data):
    d = shared_data / "dicom"
    if not (d / "RG1_J2KI.dcm").exists():
        pytest.skip("RG1_J2KI.dcm absent")
    lossy, ref = read_image(d / "RG1_J2KI.dcm"), read_image(d / "RG1_J2KI_decompressed_ExplicitVRLE.dcm")
    assert lossy.photometric == "MONOCHROME1" and lossy.meta["bits_stored"] == 15
    diff = np.abs(lossy.pixels.astype(np.int32) - ref.pixels.astype(np.int32))
    assert diff.mean() < 1.0 and diff.max() <= 64
    lossless, ref3 = read_image(d / "RG3_J2KR.dcm"), read_image(d / "RG3_J2KR_decompressed_ExplicitVRLE.dcm")
    np.testing.assert_array_equal(lossless.pixels, ref3.pixels)
    small = lossy.pixels[:40, :30]
    lossy.pixels = small
    lossy.dataset.Rows, lossy.dataset.Columns = small.shape
    out = derive_dicom(lossy.dataset, np.repeat(np.repeat(small, 2, 0), 2, 1), 2, "m")
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionRatio == lossy.dataset.LossyImageCompressionRatio
    assert out.file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_shared_jpeg_baseline_dicom(shared_data):
    path = shared_data / "dicom" / "SIIM_CR_chest_PA_8bit.dcm"
    if not path.exists():
        pytest.skip("SIIM sample absent")
    img = read_image(path)
    assert img.dtype == np.uint8 and img.max_value == 255 and img.photometric == "MONOCHROME2"


def test_pydicom_warnings_do_not_leak_values(tmp_path, caplog):
    import warnings

    ds = make_cr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientBirthDate = "SECRETDOB"  # invalid DA: pydicom warns quoting the value
        ds.PatientAge = "SECRETAGE"
    path = save(ds, tmp_path / "w.dcm")
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        img = read_image(path)
        write_image(make_output(img, upscaled(img), 2, "m"), tmp_path / "w_x2.dcm")
    text = caplog.text + " ".join(str(w.message) for w in caught)
    assert "SECRET" not in text


def test_rgb_dicom_shutters_overlay_icon_dates(tmp_path):
    from datetime import datetime

    from pydicom.sequence import Sequence

    ds = make_cr()
    rgb = np.random.default_rng(3).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    ds.set_pixel_data(rgb, "RGB", 8, generate_instance_uid=False)
    ds.ShutterShape = "RECTANGULAR"
    ds.ShutterLeftVerticalEdge, ds.ShutterRightVerticalEdge = 2, 4
    ds.ShutterUpperHorizontalEdge, ds.ShutterLowerHorizontalEdge = 1, 6
    ds.add_new(0x60000010, "US", 6)  # overlay rows (source pixel units)
    icon = Dataset()
    icon.Rows = 1
    ds.IconImageSequence = Sequence([icon])
    img = read_image(save(ds, tmp_path / "rgb.dcm"))
    assert img.photometric == "RGB" and img.dtype == np.uint8 and img.max_value == 255
    np.testing.assert_array_equal(img.pixels, rgb)
    out = derive_dicom(img.dataset, upscaled(img, 3), 3, "m", now=datetime(2025, 1, 2, 3, 4, 5))
    assert (
        out.PhotometricInterpretation == "RGB" and out.SamplesPerPixel == 3 and out.PlanarConfiguration == 0
    )
    assert (out.ShutterLeftVerticalEdge, out.ShutterRightVerticalEdge) == (4, 12)
    assert (out.ShutterUpperHorizontalEdge, out.ShutterLowerHorizontalEdge) == (1, 18)
    assert 0x60000010 not in out and "IconImageSequence" not in out
    assert out.ContentDate == "20250102" and out.ContentTime.startswith("030405")
    back = read_image(write_image(make_output(img, upscaled(img, 3), 3, "m"), tmp_path / "rgb_x3.dcm"))
    np.testing.assert_array_equal(back.pixels, upscaled(img, 3))


def test_quiet_swallows_pydicom_log_and_warnings(caplog):
    import warnings

    from pydicom.misc import warn_and_log

    from medsr.io.dicom import _quiet

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        with _quiet("x"):
            warn_and_log("Invalid value for VR PN: 'SECRETSURNAME'")
    assert not caught and "SECRET" not in caplog.text and "1 DICOM warning" in caplog.text


def test_image_from_dataset_in_memory():
    from medsr.io.dicom import image_from_dataset

    ds = make_cr("MONOCHROME1")
    img = image_from_dataset(ds)
    assert (
        img.path is None and img.dataset is ds and img.photometric == "MONOCHROME1" and img.max_value == 4095
    )
    out = make_output(img, upscaled(img, 2), 2, "m")
    assert out.dataset.Rows == 40 and out.dataset.SOPInstanceUID != ds.SOPInstanceUID
    del ds.PixelData
    with pytest.raises(ImageReadError, match="<dataset>: DICOM file has no pixel data"):
        image_from_dataset(ds)
