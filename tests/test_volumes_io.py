"""Volume I/O: NIfTI/MGZ via nibabel, DICOM series (classic and enhanced multi-frame) with checked geometry,
the derived DICOM series, and agreement with dcm2niix (synthetic series here; the real tilted GE CT series of
../shared/data/volumes/dicom-ct-tilt when present)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

from conftest import SHARED_DATA  # noqa: E402

import medsr  # noqa: E402
from medsr.volumes import (  # noqa: E402
    Volume,
    VolumeError,
    is_volume_path,
    probe_volume,
    read_volume,
    write_dicom_series,
    write_nifti,
)

TILT_DIR = SHARED_DATA / "volumes" / "dicom-ct-tilt"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
W1, W2 = "a" * 64, "b" * 64


def dcm2niix_exe() -> str | None:
    exe = Path(sys.executable).with_name("dcm2niix")
    return str(exe) if exe.exists() else shutil.which("dcm2niix")


# ---------------------------------------------------------------------------------------- synthetic series


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def pattern(rows: int, cols: int, k: int) -> np.ndarray:
    """Stored values that identify (row, column, slice)."""
    r, c = np.mgrid[0:rows, 0:cols]
    return ((r * 7 + c * 3 + k * 101) % 3000 - 500).astype(np.int16)


def make_series(
    folder: Path, *, n: int = 6, rows: int = 40, cols: int = 48, row_dir=(1, 0, 0), col_dir=(0, 1, 0),
    spacing=(0.8, 0.7), origin=(-10.0, 20.0, 5.0), step=None, slope: float = 1.0, intercept: float = -1024.0,
    series_uid: str = "1.2.3.4.5.6.1", shuffle: bool = True, modality: str = "CT", positions=None,
    seed: int = 0, prefix: str = "f", tilt: float = 0.0,
) -> list[Path]:
    """A classic single-frame series from pydicom's CT_small.dcm: slice k at origin + k * step (default: 2.5 mm
    along the normal), files and InstanceNumbers in shuffled order. Slice k's stored pixels: pattern(k)."""
    from pydicom.data import get_testdata_file

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    step = normal * 2.5 if step is None else np.asarray(step, float)
    if positions is None:
        positions = [np.asarray(origin) + k * step for k in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(positions)) if shuffle else np.arange(len(positions))
    files = []
    for k, pos in enumerate(positions):
        ds = copy.deepcopy(base)
        if "DataSetTrailingPadding" in ds:
            del ds.DataSetTrailingPadding
        del ds.PixelPaddingValue
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3.4.5.6"
        ds.FrameOfReferenceUID = "1.2.3.4.5.6.9"
        ds.SOPInstanceUID = f"{series_uid}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(order[k]) + 1  # unrelated to the position
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[0]}", f"{spacing[1]}"]
        ds.SliceThickness = f"{np.linalg.norm(step):.4f}"
        ds.SpacingBetweenSlices = f"{abs(step @ normal):.4f}"
        ds.SliceLocation = f"{normal @ np.asarray(pos):.4f}"
        ds.Rows, ds.Columns = rows, cols
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.GantryDetectorTilt = f"{tilt:g}"
        ds.PixelData = pattern(rows, cols, k).tobytes()
        path = folder / f"{prefix}{int(order[k]):03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def expected_affine(row_dir, col_dir, spacing, origin, step) -> np.ndarray:
    """Hand-computed: columns i -> row_dir * column spacing, j -> col_dir * row spacing, k -> step; LPS->RAS."""
    a = np.eye(4)
    a[:3, 0] = np.asarray(row_dir) * spacing[1]
    a[:3, 1] = np.asarray(col_dir) * spacing[0]
    a[:3, 2] = step
    a[:3, 3] = origin
    return LPS_TO_RAS @ a


def hu(k: int, rows: int = 40, cols: int = 48, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """Slice k as nibabel orders it: [column, row] in rescaled units."""
    return (pattern(rows, cols, k).astype(np.float64) * slope + intercept).T


# ------------------------------------------------------------------------------------------- NIfTI / MGZ


@pytest.mark.parametrize("name,dtype,scaled", [("v.nii.gz", np.int16, False), ("v.nii", np.float32, False),
                                               ("s.nii.gz", np.int16, True), ("m.mgz", np.uint8, False)])
def test_nifti_mgz_read_matches_nibabel(tmp_path: Path, name: str, dtype, scaled: bool) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.random((7, 9, 5)) * 200).astype(dtype)
    aff = np.array([[0, -1.1, 0, 30], [0.9, 0, 0.1, -20], [0, 0, 2.5, 12], [0, 0, 0, 1]])
    path = tmp_path / name
    if name.endswith(".mgz"):
        nib.save(nib.MGHImage(arr, aff), path)
    else:
        img = nib.Nifti1Image(arr, aff)
        if scaled:
            img.header.set_slope_inter(0.5, -3.0)
        nib.save(img, path)
    vol = read_volume(path)
    ref = nib.load(path)
    assert np.array_equal(vol.array, np.asanyarray(ref.dataobj))
    assert np.allclose(vol.affine, ref.affine)
    if scaled:
        assert vol.array.dtype.kind == "f" and np.allclose(vol.array, arr * 0.5 - 3.0)
    else:
        assert vol.array.dtype == dtype and np.array_equal(vol.array, arr)
    assert vol.meta.format == ("mgz" if name.endswith(".mgz") else "nifti")


@pytest.mark.parametrize("name", ["out.nii", "out.nii.gz"])
def test_write_nifti_round_trip(tmp_path: Path, name: str) -> None:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    aff = np.array([[-0.7, 0, 0, 10], [0, -0.8, 0.3, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])  # sheared
    out = write_nifti(Volume(arr, aff), tmp_path / name)
    img = nib.load(out)
    assert np.array_equal(np.asanyarray(img.dataobj), arr) and img.get_data_dtype() == np.int16
    assert np.allclose(img.affine, aff) and int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp left
    f64 = write_nifti(Volume(arr.astype(np.float64) / 3, aff), tmp_path / "f.nii.gz")
    assert nib.load(f64).get_data_dtype() == np.float32
    with pytest.raises(VolumeError, match=r"\.nii or \.nii\.gz"):
        write_nifti(Volume(arr, aff), tmp_path / "x.img")


def test_nifti_refusals(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(VolumeError, match=r"t\.nii: a 4D \(2 volumes\)"):
        read_volume(tmp_path / "t.nii")
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip at all")
    with pytest.raises(VolumeError, match=r"bad\.nii\.gz: not a readable NIfTI"):
        read_volume(tmp_path / "bad.nii.gz")
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "missing.nii")


# --------------------------------------------------------------------------------------- DICOM series


def test_axial_series_hand_computed_affine_and_hu(tmp_path: Path) -> None:
    make_series(tmp_path / "s")
    vol = medsr.read_volume(tmp_path / "s")  # the public, lazy entry
    exp = np.array([[-0.7, 0, 0, 10.0], [0, -0.8, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    assert np.allclose(vol.affine, exp, atol=1e-9)
    assert vol.shape == (48, 40, 6) and vol.array.dtype == np.int16  # int16 stored - 1024 fits int16
    for k in range(6):
        assert np.array_equal(vol.array[:, :, k], hu(k))
    assert vol.meta.units == "HU" and vol.meta.modality == "CT" and vol.meta.series_uid == "1.2.3.4.5.6.1"
    positions = [float(ds.ImagePositionPatient[2]) for ds in vol.meta.datasets]
    assert positions == sorted(positions)


def test_oblique_series_voxels_at_their_dicom_positions(tmp_path: Path) -> None:
    rot = rotation(0.3, -0.2, 0.5)
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    origin, step = np.array([12.0, -40.0, 33.0]), rot[:, 2] * 3.0
    files = make_series(tmp_path / "s", row_dir=row_dir, col_dir=col_dir, origin=origin, step=step, n=5,
                        slope=2.5, intercept=-7.25)
    vol = read_volume(files[::-1])  # a list of files, any order
    assert np.allclose(vol.affine, expected_affine(row_dir, col_dir, (0.8, 0.7), origin, step), atol=1e-5)
    assert vol.array.dtype == np.float32
    # every file: its pixel (r, c) is voxel (c, r, k) and sits at IPP + c * cs * row + r * rs * col
    for f in files:
        ds = pydicom.dcmread(f)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        k = int(round(np.linalg.norm(ipp - origin) / 3.0))
        for r, c in ((0, 0), (39, 0), (5, 47), (39, 47)):
            world = LPS_TO_RAS[:3, :3] @ (ipp + c * 0.7 * row_dir + r * 0.8 * col_dir)
            assert np.allclose(vol.affine @ [c, r, k, 1], [*world, 1], atol=1e-4)
            assert vol.array[c, r, k] == pytest.approx(float(ds.pixel_array[r, c]) * 2.5 - 7.25)


def test_unsigned_mr_keeps_dtype(tmp_path: Path) -> None:
    make_series(tmp_path / "mr", modality="MR", intercept=0.0, n=3)
    vol = read_volume(tmp_path / "mr")
    assert vol.array.dtype == np.int16 and vol.meta.units == ""  # CT_small is signed: stored dtype kept


def test_gantry_tilt_read_with_sheared_affine(tmp_path: Path) -> None:
    """GE-style tilt: the image plane is tilted about x, the positions step along z only."""
    t = np.radians(18.5)
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])
    make_series(tmp_path / "s", col_dir=col_dir, step=(0, 0, 4.0 / np.cos(t)), n=5)
    vol = read_volume(tmp_path / "s")
    assert vol.meta.tilt_deg == pytest.approx(18.5, abs=1e-3)
    assert any("sheared" in n for n in vol.meta.notes)
    exp = expected_affine((1, 0, 0), col_dir, (0.8, 0.7), (-10, 20, 5), (0, 0, 4.0 / np.cos(t)))
    assert np.allclose(vol.affine, exp, atol=1e-5)
    # slice spacing along the normal is 4 mm: the slice axis is not perpendicular to the planes
    normal = np.cross(vol.affine[:3, 0], vol.affine[:3, 1])
    assert abs(vol.affine[:3, 2] @ normal / np.linalg.norm(normal)) == pytest.approx(4.0, abs=1e-4)



def test_series_read_memory_is_bounded(tmp_path: Path) -> None:
    """Pixels go slice by slice into one preallocated array: beyond the result (array + headers), the peak
    holds a few slices, however many slices the series has (measured: about 7 slice sizes)."""
    import tracemalloc

    make_series(tmp_path / "s", n=12, rows=128, cols=128)
    read_volume(tmp_path / "s")  # imports and caches outside the measurement
    tracemalloc.start()
    try:
        vol = read_volume(tmp_path / "s")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    slice_bytes = 128 * 128 * 2
    assert vol.array.nbytes == 12 * slice_bytes
    assert peak - current < 12 * slice_bytes, (peak - current) / slice_bytes


# ------------------------------------------------------------------------------------------ refusals


def test_refuse_two_series_unless_chosen(tmp_path: Path) -> None:
    make_series(tmp_path / "s", series_uid="1.2.3.4.5.6.1", n=3)
    make_series(tmp_path / "s", series_uid="1.2.3.4.5.6.2", n=4, origin=(0, 0, 100), prefix="g")
    with pytest.raises(VolumeError, match=r"holds 2 CT/MR series; choose one .*1\.2\.3\.4\.5\.6\.2 .*1\.2\.3\.4\.5\.6\.1"):
        read_volume(tmp_path / "s")
    assert read_volume(tmp_path / "s", series_uid="1.2.3.4.5.6.2").shape == (48, 40, 4)


def test_refuse_missing_slice(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", n=6, shuffle=False)
    files[3].unlink()
    with pytest.raises(VolumeError, match=r"series 1\.2\.3\.4\.5\.6\.1: missing slices: 1 slice\(s\) missing \(gap of 5 mm"):
        read_volume(tmp_path / "s")


def test_refuse_non_uniform_spacing(tmp_path: Path) -> None:
    pos = [(0, 0, z) for z in (0.0, 2.0, 4.0, 7.0, 10.0)]
    make_series(tmp_path / "s", positions=pos)
    with pytest.raises(VolumeError, match=r"series 1\.2\.3\.4\.5\.6\.1: non-uniform slice spacing along the normal: 2 to 3 mm"):
        read_volume(tmp_path / "s")
    # within the tolerance (1 %): accepted
    make_series(tmp_path / "ok", positions=[(0, 0, z) for z in (0.0, 2.0, 4.01, 6.0)])
    assert read_volume(tmp_path / "ok").shape[2] == 4


def test_refuse_mixed_orientation(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", n=4, shuffle=False)
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(files[2])
    with pytest.raises(VolumeError, match=r"series 1\.2\.3\.4\.5\.6\.1: mixed orientations: 2 different ImageOrientationPatient"):
        read_volume(tmp_path / "s")


def test_refuse_4d(tmp_path: Path) -> None:
    pos = [(0, 0, 2.0 * k) for k in range(3)] * 2  # two volumes at the same positions
    make_series(tmp_path / "rep", positions=pos)
    with pytest.raises(VolumeError, match=r"4D or duplicated: 6 images at 3 distinct slice positions"):
        read_volume(tmp_path / "rep")
    files = make_series(tmp_path / "tp", n=4)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.TemporalPositionIdentifier = 1 + i % 2
        ds.save_as(f)
    with pytest.raises(VolumeError, match=r"4D: 2 temporal positions"):
        read_volume(tmp_path / "tp")


def test_refuse_mosaic(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", n=3, modality="MR")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
        ds.save_as(f)
    with pytest.raises(VolumeError, match=r"series 1\.2\.3\.4\.5\.6\.1: .*f00\d\.dcm: a Siemens MOSAIC"):
        read_volume(tmp_path / "s")


def test_refuse_not_a_series(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("hello")
    with pytest.raises(VolumeError, match=r"no CT/MR image series .*1 non-DICOM"):
        read_volume(tmp_path / "e")
    files = make_series(tmp_path / "one", n=1)
    with pytest.raises(VolumeError, match="a volume needs at least 2 slices"):
        read_volume(files)


# ------------------------------------------------------------------------------------------ enhanced


def make_enhanced(path: Path, *, n: int = 5, rows: int = 32, cols: int = 36, temporal: bool = False) -> None:
    """An Enhanced CT Image file: shared pixel measures / orientation / rescale, per-frame positions, frames
    stored in shuffled order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    rot = rotation(0.1, 0.2, -0.3)
    order = np.random.default_rng(3).permutation(n)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.9.1"
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = "1.2.3.9", "1.2.3", "1.2.3.8"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing, pm.SliceThickness = [0.6, 0.9], 1.5
    po = Dataset()
    po.ImageOrientationPatient = [float(v) for v in (*rot[:, 0], *rot[:, 1])]
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, -1024, "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([pm]), Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, per_frame = [], []
    for f in range(n):
        k = int(order[f])
        fg = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [float(v) for v in np.array([5.0, -3.0, 40.0]) + k * 1.5 * rot[:, 2]]
        fc = Dataset()
        fc.StackID, fc.InStackPositionNumber = "1", k + 1
        fc.TemporalPositionIndex = 1 + (f % 2 if temporal else 0)
        fg.PlanePositionSequence, fg.FrameContentSequence = Sequence([pp]), Sequence([fc])
        per_frame.append(fg)
        frames.append(pattern(rows, cols, k))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return rot


def test_enhanced_multiframe(tmp_path: Path) -> None:
    rot = make_enhanced(tmp_path / "enh.dcm")
    probe = probe_volume(tmp_path / "enh.dcm")
    assert probe is not None and probe.kind == "dicom-enhanced"
    vol = read_volume(tmp_path / "enh.dcm")
    exp = expected_affine(rot[:, 0], rot[:, 1], (0.6, 0.9), (5.0, -3.0, 40.0), 1.5 * rot[:, 2])
    assert np.allclose(vol.affine, exp, atol=1e-6)
    assert vol.shape == (36, 32, 5) and vol.meta.units == "HU"
    for k in range(5):
        assert np.array_equal(vol.array[:, :, k], hu(k, 32, 36))
    make_enhanced(tmp_path / "t.dcm", temporal=True)
    with pytest.raises(VolumeError, match=r"series 1\.2\.3\.9: 4D: 2 temporal positions"):
        read_volume(tmp_path / "t.dcm")


# -------------------------------------------------------------------------------------------- probe


def test_probe_tells_volumes_from_2d(tmp_path: Path) -> None:
    make_series(tmp_path / "ct", n=3)
    p = probe_volume(tmp_path / "ct")
    assert p is not None and p.kind == "dicom-series" and p.series == {"1.2.3.4.5.6.1": 3}
    assert "CT DICOM series 1.2.3.4.5.6.1: 3 images" in p.description
    make_series(tmp_path / "two", n=2)
    assert not is_volume_path(tmp_path / "two")  # 2 slices: not a volume for the CLI
    (tmp_path / "png").mkdir()
    import cv2

    for i in range(4):
        cv2.imwrite(str(tmp_path / "png" / f"{i}.png"), np.zeros((8, 8), np.uint8))
    assert not is_volume_path(tmp_path / "png")
    from pydicom.data import get_testdata_file

    assert not is_volume_path(get_testdata_file("CT_small.dcm"))  # one 2D image
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "v.nii.gz")
    assert probe_volume(tmp_path / "v.nii.gz").kind == "nifti"


# ------------------------------------------------------------------------------------------- dcm2niix


def run_dcm2niix(folder: Path, out: Path) -> list[Path]:
    exe = dcm2niix_exe()
    if exe is None:
        pytest.skip("skipped: dcm2niix not installed (pip install dcm2niix)")
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([exe, "-z", "n", "-b", "n", "-f", "%j", "-o", str(out), str(folder)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return sorted(out.glob("*.nii"))


def canonical(arr: np.ndarray, aff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(arr, np.float32), aff))
    return np.asanyarray(img.dataobj), img.affine


@pytest.mark.parametrize("geometry", ["axial", "oblique", "enhanced"])
def test_agrees_with_dcm2niix(tmp_path: Path, geometry: str) -> None:
    """Measured: max |affine difference| after canonicalisation 0.8e-6 (axial), 2.1e-6 (oblique), 1.5e-6 mm
    (enhanced multi-frame); the voxel arrays are identical."""
    if geometry == "enhanced":
        (tmp_path / "s").mkdir()
        make_enhanced(tmp_path / "s" / "enh.dcm")
    else:
        rot = np.eye(3) if geometry == "axial" else rotation(0.25, -0.15, 0.4)
        make_series(tmp_path / "s", row_dir=rot[:, 0], col_dir=rot[:, 1], step=2.0 * rot[:, 2], n=7)
    vol = read_volume(tmp_path / "s")
    (ref,) = run_dcm2niix(tmp_path / "s", tmp_path / "out")
    img = nib.load(ref)
    a, aa = canonical(vol.array, vol.affine)
    b, ba = canonical(img.get_fdata(), img.affine)
    assert np.abs(aa - ba).max() < 1e-3  # dcm2niix stores the affine as float32
    assert np.array_equal(a, b)


def test_tilted_series_against_dcm2niix(tmp_path: Path) -> None:
    """dcm2niix resamples a tilted series onto an orthogonal grid (``*_Tilt_1.nii``): the in-plane axes and
    the slice planes (offsets along the normal) must equal ours, and its resampled voxels must match ours
    interpolated at its voxel centres."""
    t = np.radians(18.5)
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])
    make_series(tmp_path / "s", col_dir=col_dir, step=(0, 0, 4.0 / np.cos(t)), n=6, rows=48, cols=48,
                tilt=18.5)
    vol = read_volume(tmp_path / "s")
    compare_tilt(vol, run_dcm2niix(tmp_path / "s", tmp_path / "out"))


def compare_tilt(vol: Volume, outputs: list[Path]) -> dict[str, float]:
    from scipy.ndimage import map_coordinates

    tilt = [p for p in outputs if "_Tilt" in p.name]
    assert tilt, f"dcm2niix wrote no tilt-corrected output: {[p.name for p in outputs]}"
    img = nib.load(tilt[0])
    ref = img.get_fdata()
    ours = vol.affine
    normal = np.cross(ours[:3, 0], ours[:3, 1])
    normal /= np.linalg.norm(normal)
    # in-plane axes: equal up to dcm2niix's row flip
    assert np.allclose(np.abs(img.affine[:3, 0]), np.abs(ours[:3, 0]), atol=1e-3)
    assert np.allclose(np.abs(img.affine[:3, 1]), np.abs(ours[:3, 1]), atol=1e-3)
    # the same slice planes, in the same or reversed order
    ours_planes = np.array([normal @ (ours @ [0, 0, k, 1])[:3] for k in range(vol.shape[2])])
    ref_planes = np.array([normal @ (img.affine @ [0, 0, k, 1])[:3] for k in range(ref.shape[2])])
    plane_diff = min(np.abs(ours_planes - ref_planes).max(), np.abs(ours_planes - ref_planes[::-1]).max())
    assert plane_diff < 1e-2
    # dcm2niix's voxels (every 3rd column and row of every slice), sampled from ours (linear) at their centres
    grid = [np.arange(0, ref.shape[0], 3), np.arange(0, ref.shape[1], 3), np.arange(ref.shape[2])]
    ijk = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 3)
    world = img.affine @ np.c_[ijk, np.ones(len(ijk))].T
    src = np.linalg.solve(ours, world)[:3]
    inside = np.all((src > 0.5) & (src < np.array(vol.shape)[:, None] - 1.5), axis=0)
    sampled = map_coordinates(vol.array.astype(np.float32), src[:, inside], order=1)
    ref_all = ref[np.ix_(*grid)].reshape(-1)
    diff = np.abs(sampled - ref_all[inside])
    ref_in = ref_all[inside]
    stats = {"plane_mm": float(plane_diff), "mean_abs": float(diff.mean()), "p99_abs": float(np.percentile(diff, 99)),
             "ref_range": float(np.ptp(ref_in)), "corr": float(np.corrcoef(sampled, ref_in)[0, 1]),
             "inside": float(inside.mean())}
    print("dcm2niix tilt comparison:", stats)
    assert inside.mean() > 0.5
    # measured: mean 0.25 HU (synthetic), 0.71 / 0.74 HU (real 4 mm / 7 mm halves): dcm2niix rounds to integers
    assert stats["corr"] > 0.999 and stats["mean_abs"] < 1.5 and stats["p99_abs"] < 2.0, stats
    return stats


# --------------------------------------------------------------------------------- real tilted series


@pytest.fixture
def tilt_dir() -> Path:
    if not TILT_DIR.is_dir():
        pytest.skip(f"skipped: shared data not present ({TILT_DIR}); the synthetic tilt tests still run")
    return TILT_DIR


def test_real_tilt_series_refused_non_uniform(tilt_dir: Path) -> None:
    with pytest.raises(VolumeError) as e:
        read_volume(tilt_dir)
    msg = str(e.value)
    assert "series 1.2.826.0.1.3680043.9.4245.3115138630835728997848661150714813892" in msg
    assert re.search(r"non-uniform slice spacing along the normal: 1\.08 to 7 mm", msg), msg


@pytest.mark.parametrize("part", [range(1, 15), range(15, 29)], ids=["4mm", "7mm"])
def test_real_tilt_halves_agree_with_dcm2niix(tilt_dir: Path, tmp_path: Path, part: range) -> None:
    files = [tilt_dir / f"{i:02d}.dcm" for i in part]
    vol = read_volume(files)
    assert vol.meta.tilt_deg == pytest.approx(18.5, abs=0.05) and vol.array.dtype == np.int16
    step = 4.0 if part.start == 1 else 7.0
    normal = np.cross(vol.affine[:3, 0], vol.affine[:3, 1])
    assert vol.affine[:3, 2] @ normal / np.linalg.norm(normal) == pytest.approx(step, abs=0.01)
    (tmp_path / "in").mkdir()
    for f in files:
        shutil.copy(f, tmp_path / "in" / f.name)  # a temporary copy for dcm2niix (never into the repository)
    compare_tilt(vol, run_dcm2niix(tmp_path / "in", tmp_path / "out"))


# ------------------------------------------------------------------------------------ derived series


def upsample_k(vol: Volume, factor: int) -> Volume:
    """A stand-in for the method: repeat slices along k, affine updated (voxel centres kept in place)."""
    arr = np.repeat(vol.array, factor, axis=2)
    aff = vol.affine.copy()
    aff[:3, 2] = vol.affine[:3, 2] / factor
    aff[:3, 3] = vol.affine[:3, 3] - (factor - 1) / (2 * factor) * vol.affine[:3, 2]
    return Volume(arr, aff)


def test_derived_series_round_trip(tmp_path: Path) -> None:
    rot = rotation(0.2, 0.1, -0.25)
    make_series(tmp_path / "src", row_dir=rot[:, 0], col_dir=rot[:, 1], step=3.0 * rot[:, 2], n=4)
    src = read_volume(tmp_path / "src")
    up = upsample_k(src, 2)
    files = write_dicom_series(up, src, tmp_path / "out", weights_sha256=W1, model_id="m", factor=2)
    assert len(files) == 8 and all(f.exists() for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    back = read_volume(tmp_path / "out")
    assert np.allclose(back.affine, up.affine, atol=1e-4)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, up.array)  # HU round-trip
    ds = [pydicom.dcmread(f) for f in files]
    s0 = pydicom.dcmread(next((tmp_path / "src").iterdir()))
    assert all(d.StudyInstanceUID == s0.StudyInstanceUID and d.FrameOfReferenceUID == s0.FrameOfReferenceUID for d in ds)
    assert len({d.SeriesInstanceUID for d in ds}) == 1 and ds[0].SeriesInstanceUID != s0.SeriesInstanceUID
    assert len({d.SOPInstanceUID for d in ds}) == 8
    assert list(ds[0].ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert ds[0].file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert float(ds[0].SpacingBetweenSlices) == pytest.approx(1.5) and float(ds[0].SliceThickness) == pytest.approx(1.5)
    assert [float(v) for v in ds[0].PixelSpacing] == pytest.approx([0.8, 0.7])
    assert np.allclose([float(v) for v in ds[0].ImageOrientationPatient], s0.ImageOrientationPatient, atol=1e-6)
    assert "Through-plane super-resolution x2" in ds[0].DerivationDescription and W1 in ds[0].DerivationDescription
    assert ds[0].SeriesNumber == int(s0.SeriesNumber) + 1000
    assert ds[0].RescaleIntercept == -1024 and ds[0].RescaleType == "HU"
    locs = [float(d.SliceLocation) for d in ds]
    assert np.allclose(np.diff(locs), 1.5, atol=1e-4)
    # deterministic, and distinct per weights and per factor
    again = write_dicom_series(up, src, tmp_path / "again", weights_sha256=W1, model_id="m", factor=2)
    assert [pydicom.dcmread(f).SOPInstanceUID for f in again] == [d.SOPInstanceUID for d in ds]
    other_w = write_dicom_series(up, src, tmp_path / "w2", weights_sha256=W2, model_id="m", factor=2)
    other_f = write_dicom_series(up, src, tmp_path / "f3", weights_sha256=W1, model_id="m", factor=3)
    uids = {pydicom.dcmread(x[0]).SeriesInstanceUID for x in (files, other_w, other_f)}
    assert len(uids) == 3
    # refuses to overwrite unless asked
    with pytest.raises(VolumeError, match="exists; refusing to overwrite"):
        write_dicom_series(up, src, tmp_path / "out", weights_sha256=W1, model_id="m", factor=2)
    write_dicom_series(src, src, tmp_path / "out", weights_sha256=W1, model_id="m", factor=2, overwrite=True)
    assert len(list((tmp_path / "out").iterdir())) == 4


def test_derived_series_float_and_tilted(tmp_path: Path) -> None:
    t = np.radians(18.5)
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])
    make_series(tmp_path / "src", col_dir=col_dir, step=(0, 0, 4.0 / np.cos(t)), n=3)
    src = read_volume(tmp_path / "src")
    up = upsample_k(src, 3)
    up.array = up.array.astype(np.float32) + 0.3  # a model's float output: rounded to the nearest HU
    write_dicom_series(up, src, tmp_path / "out", weights_sha256=None, model_id="m", factor=3, syntax="rle")
    back = read_volume(tmp_path / "out")
    assert np.allclose(back.affine, up.affine, atol=1e-4) and back.meta.tilt_deg == pytest.approx(18.5, abs=1e-3)
    assert np.array_equal(back.array, np.rint(up.array).astype(np.int16))


def test_derived_series_from_enhanced_source(tmp_path: Path) -> None:
    make_enhanced(tmp_path / "enh.dcm")
    src = read_volume(tmp_path / "enh.dcm")
    up = upsample_k(src, 2)
    files = write_dicom_series(up, src, tmp_path / "out", weights_sha256=W1, model_id="m", factor=2)
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and "PerFrameFunctionalGroupsSequence" not in ds
    back = read_volume(tmp_path / "out")
    assert np.allclose(back.affine, up.affine, atol=1e-4) and np.array_equal(back.array, up.array)


def test_derived_series_refusals(tmp_path: Path) -> None:
    vol = Volume(np.zeros((4, 4, 3), np.int16), np.eye(4))
    with pytest.raises(VolumeError, match="needs a DICOM source volume"):
        write_dicom_series(vol, vol, tmp_path / "o", weights_sha256=W1, model_id="m", factor=2)
    make_series(tmp_path / "src", n=3)
    src = read_volume(tmp_path / "src")
    bad = Volume(src.array.astype(np.float32), src.affine)
    bad.array[1, 2, 1] = np.nan
    with pytest.raises(VolumeError, match=r"o: slice 2 of the volume holds NaN"):
        write_dicom_series(bad, src, tmp_path / "o", weights_sha256=W1, model_id="m", factor=1)
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(VolumeError, match="weights_sha256 must be 64 hex"):
        write_dicom_series(src, src, tmp_path / "o", weights_sha256="xyz", model_id="m", factor=1)


def test_corrupt_pixels_named(tmp_path: Path) -> None:
    files = make_series(tmp_path / "s", n=3, shuffle=False)
    ds = pydicom.dcmread(files[1])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(files[1])
    with pytest.raises(VolumeError, match=r"series 1\.2\.3\.4\.5\.6\.1: .*f001\.dcm: pixel data is truncated"):
        read_volume(tmp_path / "s")


def test_derived_instance_passes_dciodvfy(tmp_path: Path) -> None:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("skipped: dciodvfy not installed (Debian/Ubuntu: apt-get install dicom3tools)")
    from test_dicom_dciodvfy import messages

    make_series(tmp_path / "src", n=3, rows=64, cols=64)
    src = read_volume(tmp_path / "src")
    files = write_dicom_series(upsample_k(src, 2), src, tmp_path / "out", weights_sha256=W1, model_id="m", factor=2)
    source_file = next((tmp_path / "src").iterdir())
    new = messages(exe, files[1]) - messages(exe, source_file)
    assert not new, "dciodvfy reports what the source does not have:\n" + "\n".join(sorted(new))


def test_orthanc_stores_one_new_series_in_the_same_study(tmp_path: Path) -> None:
    """A real Orthanc (in a private network namespace, as tests/test_pacs_orthanc.py) takes the source series
    and the derived series: one study, two series, every instance stored."""
    if not shutil.which("Orthanc"):
        pytest.skip("skipped: Orthanc not installed (apt-get install orthanc)")
    from test_pacs_orthanc import _netns_prefix

    prefix = _netns_prefix()
    make_series(tmp_path / "src", n=3, rows=64, cols=64)
    src = read_volume(tmp_path / "src")
    files = write_dicom_series(upsample_k(src, 2), src, tmp_path / "out", weights_sha256=W1, model_id="m", factor=2)
    (tmp_path / "work").mkdir()
    script = Path(__file__).with_name("volumes_orthanc_check.py")
    cmd = [*prefix, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, str(script),
           str(tmp_path / "work"), str(tmp_path / "src"), str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr + (tmp_path / "work" / "orthanc.log").read_text()[-2000:]
    import json

    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["statuses"] == ["Success"]
    derived_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert result["stored"] == {"1.2.3.4.5.6": {"1.2.3.4.5.6.1": 3, derived_uid: 6}}
