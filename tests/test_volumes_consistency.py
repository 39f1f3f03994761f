"""Data consistency along the LR axis (medsr.volumes.consistency) and the through-plane contract v2."""

from __future__ import annotations

import numpy as np
import pytest

from medsr.volumes import Volume, VolumeError
from medsr.volumes.consistency import Projector, forward_matrix
from medsr.volumes.throughplane import CONTRACT_V1, CONTRACT_V2, model_contract, reconstruct, resample_axis
from medsr.volumes.training import degrade_rows, simulate_thick


class Flat:
    """A scale-1 slice model with a contract that returns a constant residual (0 by default)."""

    scale = 1

    def __init__(self, contract: str, residual: float = 0.0) -> None:
        self.contract = contract
        self.residual = residual

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.full_like(x, 0.5 + self.residual)


def _smooth(shape=(10, 9, 40), seed=0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.random(shape), 1.5) * 1000).astype(np.float32)


@pytest.mark.parametrize("r", [2, 3, 4])
def test_forward_matrix_is_the_evaluation_simulation(r: int) -> None:
    vol = _smooth()
    thick = simulate_thick(vol, 2, r)
    a = forward_matrix(np.arange(vol.shape[2]) / r, thick.shape[2])
    assert np.allclose(np.einsum("kn,ijn->ijk", a, vol), thick, atol=1e-2)  # 1e-5 of the range


def test_projection_reacquires_the_slices_and_never_moves_away_from_the_truth() -> None:
    rng = np.random.default_rng(1)
    truth = _smooth(seed=2)
    r = 4
    thick = simulate_thick(truth, 2, r)
    pos = np.arange(truth.shape[2]) / r
    p = Projector(pos, thick.shape[2])
    for _ in range(3):  # any estimate: the B-spline, or the truth plus noise
        for x in (resample_axis(thick, 2, pos, 3), truth + rng.normal(0, 50, truth.shape).astype(np.float32)):
            before = float(np.sum((x - truth) ** 2))
            y = p.along(x.copy(), thick, 2)
            assert np.allclose(np.einsum("kn,ijn->ijk", p.a, y), thick, atol=0.05)
            assert float(np.sum((y - truth) ** 2)) < before
    # the truth itself is a fixed point
    assert np.allclose(p.along(truth.copy(), thick, 2), truth, atol=0.05)


def test_forward_matrix_refuses_irregular_grids() -> None:
    with pytest.raises(ValueError, match="uniformly spaced"):
        forward_matrix(np.array([0.0, 0.5, 1.5]), 2)


def test_v2_training_input_reacquires_the_thick_rows_under_the_nominal_profile() -> None:
    im = np.random.default_rng(3).random((48, 30)).astype(np.float32)
    from medsr.volumes.training import blur_axis

    for phase in (0, 2):
        x2 = degrade_rows(im, 3, 3.6, phase, consistent=True)  # acquired with a wider profile than nominal
        thick = blur_axis(im, 0, 3.6)[phase::3]
        a = forward_matrix((np.arange(48) - phase) / 3, thick.shape[0])  # nominal FWHM = r
        assert np.allclose(a @ x2, thick, atol=1e-4)
        assert not np.allclose(a @ degrade_rows(im, 3, 3.6, phase), thick, atol=1e-2)  # v1 input does not


def test_reconstruct_feeds_each_contract_its_input() -> None:
    arr = _smooth((8, 7, 10))
    v = Volume(arr, np.diag([1.0, 1.0, 4.0, 1.0]))
    r = 4
    pos = (np.arange(40) + 0.5) / r - 0.5
    bspline = reconstruct(v, None, dtype=np.float32).array
    v1 = reconstruct(v, Flat(CONTRACT_V1), dtype=np.float32).array
    v2 = reconstruct(v, Flat(CONTRACT_V2), dtype=np.float32).array
    assert np.allclose(v1, bspline, atol=1e-2)  # zero residual: the input comes back
    a = forward_matrix(pos, 10)

    def misfit(x: np.ndarray) -> float:  # how far re-acquiring x is from the acquired slices (clipping aside)
        return float(np.mean(np.abs(np.einsum("kn,ijn->ijk", a, x) - arr)))

    assert misfit(v2) < 0.05 * misfit(bspline)  # v2's input re-acquires the slices; the B-spline does not
    # the consistency option projects the fused result: a model that pushes everything up is pulled back
    pushed = reconstruct(v, Flat(CONTRACT_V1, 0.05), dtype=np.float32).array
    pulled = reconstruct(v, Flat(CONTRACT_V1, 0.05), dtype=np.float32, consistency=True).array
    assert misfit(pushed) > 5 and misfit(pulled) < 0.05 * misfit(pushed)
    # a v2 model's result is projected by default (its contract), unless told not to
    v2_pushed = reconstruct(v, Flat(CONTRACT_V2, 0.05), dtype=np.float32).array
    v2_raw = reconstruct(v, Flat(CONTRACT_V2, 0.05), dtype=np.float32, consistency=False).array
    assert misfit(v2_pushed) < 0.05 * misfit(v2_raw) and misfit(v2_raw) > 5


def test_v2_through_memmaps_equals_in_memory(monkeypatch) -> None:
    import medsr.volumes.throughplane as tp

    v = Volume(_smooth((8, 8, 5)), np.diag([1.0, 1.0, 2.0, 1.0]))
    ref = reconstruct(v, Flat(CONTRACT_V2, 0.01), consistency=True).array
    monkeypatch.setattr(tp, "MEMMAP_VOXELS", 100)
    mm = reconstruct(v, Flat(CONTRACT_V2, 0.01), consistency=True).array
    assert isinstance(mm, np.memmap) and np.allclose(mm, ref, atol=1e-3)


def test_contracts_are_read_from_the_model_and_unknown_ones_refused() -> None:
    assert model_contract(Flat(CONTRACT_V2)) == CONTRACT_V2

    class Bare:
        scale = 1

        def __call__(self, x: np.ndarray) -> np.ndarray:
            return x

    assert model_contract(Bare()) == CONTRACT_V1  # nothing recorded: the first contract
    v = Volume(_smooth((6, 6, 4)), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(VolumeError, match="call contract 'something-else'"):
        reconstruct(v, Flat("something-else"))


def test_weights_record_the_contract_and_exports_carry_it(tmp_path) -> None:
    from medsr.arch import RRDBNet
    from medsr.runtime.contract import descriptor_from_metadata, read_onnx_metadata
    from medsr.weights import load_model
    from medsr.weights.load import save_weights

    m = RRDBNet(1, 1, 1, 4, 1, 4, contract=CONTRACT_V2)
    p = tmp_path / "tp.safetensors"
    save_weights(m, p, "tp")
    loaded = load_model(str(p)).model
    assert loaded.contract == CONTRACT_V2 and loaded.descriptor.contract == CONTRACT_V2
    from medsr.export import export_onnx

    onnx_path = export_onnx(loaded, tmp_path / "tp.onnx").path
    assert descriptor_from_metadata(read_onnx_metadata(onnx_path), onnx_path).contract == CONTRACT_V2
    from medsr.api import Upscaler

    for spec, runtime in ((p, "torch"), (p, "openvino"), (onnx_path, "onnxruntime"), (onnx_path, "openvino")):
        up = Upscaler.load(str(spec), runtime=runtime)  # what the volume path reads to pick the input
        assert model_contract(up) == CONTRACT_V2, (spec, runtime)


def test_slice_profile_comes_from_a_dicom_slice_thickness_and_changes_the_projection() -> None:
    from pydicom.dataset import Dataset

    from medsr.volumes import VolumeMeta
    from medsr.volumes.throughplane import slice_profile

    arr = _smooth((8, 7, 10))
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    assert slice_profile(Volume(arr, aff), 2)[0] == 1.0  # NIfTI: nothing recorded, thickness = gap
    ds = Dataset()
    ds.SliceThickness = "2.4"  # 2.4 mm slices 4 mm apart: a gap between them
    dicom = Volume(arr, aff, VolumeMeta(format="dicom", datasets=[ds]))
    f, why = slice_profile(dicom, 2)
    assert f == pytest.approx(0.6) and "SliceThickness 2.4" in why
    ds.SliceThickness = "40"
    assert slice_profile(dicom, 2)[0] == 2.0  # bounded
    ds.SliceThickness = "2.4"
    out = reconstruct(dicom, Flat(CONTRACT_V2), dtype=np.float32)
    assert any("SliceThickness 2.4" in n for n in out.meta.notes)
    a = forward_matrix((np.arange(40) + 0.5) / 4 - 0.5, 10, fwhm=0.6)
    misfit = float(np.mean(np.abs(np.einsum("kn,ijn->ijk", a, out.array) - arr)))
    nominal = reconstruct(Volume(arr, aff), Flat(CONTRACT_V2), dtype=np.float32).array
    assert misfit < 0.2 * float(np.mean(np.abs(np.einsum("kn,ijn->ijk", a, nominal) - arr)))
