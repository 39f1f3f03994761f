"""The through-plane method: interpolation, plan/affine, the two-plane fusion, intensities, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from medsr.volumes import Volume, VolumeError
from medsr.volumes.throughplane import interp_matrix, plan, reconstruct, resample_axis
from medsr.volumes.training import degrade_rows, simulate_thick


class Recorder:
    """A scale-1 slice model that returns a constant residual and records the slice shapes it saw."""

    scale = 1

    def __init__(self, residual: float = 0.0) -> None:
        self.residual = residual
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.shapes.append(x.shape)
        return np.full_like(x, 0.5 + self.residual)


def _vol(shape=(12, 10, 6), spacing=(1.0, 1.0, 3.0), dtype=np.float32, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = (rng.random(shape) * 100).astype(dtype)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-5.0, 7.0, 11.0]
    return Volume(arr, aff)


def test_interp_matrix_matches_scipy_map_coordinates() -> None:
    from scipy import ndimage

    x = np.random.default_rng(1).random(17)
    pos = np.linspace(-1.3, 17.2, 61)
    for order in (1, 3):
        ref = ndimage.map_coordinates(x, [pos], order=order, mode="mirror")
        assert np.allclose(interp_matrix(17, pos, order) @ x, ref, atol=1e-12)
    # nearest: exact samples at integer positions
    assert np.array_equal(interp_matrix(5, np.array([0.0, 1.4, 1.6, 4.0]), 0) @ np.arange(5.0), [0, 1, 2, 4])


def test_bspline_reproduces_samples_at_their_own_positions() -> None:
    arr = np.random.default_rng(2).random((4, 5, 9)).astype(np.float32)
    out = resample_axis(arr, 2, np.arange(9.0), 3)
    assert np.allclose(out, arr, atol=1e-5)


def test_plan_finds_lr_axis_factor_and_centred_affine() -> None:
    v = _vol(spacing=(0.9, 0.9, 3.6))
    p = plan(v)
    assert p.axis == 2 and p.factor == pytest.approx(4.0) and p.n_out == 24
    assert p.spacing_out == pytest.approx((0.9, 0.9, 0.9))
    # thin slices tile the thick ones: thin slice j sits at LR coordinate (j + 0.5) / r - 0.5
    world_lr = v.affine @ np.array([0, 0, 0.0, 1])
    world_thin = p.affine_out @ np.array([0, 0, 1.5, 1])  # centre of the first 4 thin slices
    assert np.allclose(world_lr, world_thin)
    assert np.allclose(np.linalg.norm(p.affine_out[:3, :3], axis=0), [0.9, 0.9, 0.9])


def test_plan_lr_axis_in_the_middle_and_oblique_affine() -> None:
    rot = np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.0, 2.0, 1.0])
    v = Volume(np.zeros((8, 5, 8), np.float32), aff)
    p = plan(v)
    assert p.axis == 1 and p.n_out == 10
    assert np.allclose(p.affine_out[:3, 1], rot[:, 1] * 1.0)


def test_isotropic_volume_refused_unless_factor_given() -> None:
    v = _vol(spacing=(1.0, 1.0, 1.1))
    with pytest.raises(VolumeError, match="isotropic"):
        plan(v)
    assert plan(v, factor=2).n_out == 12
    assert plan(v, target_spacing=0.55, axis=2).factor == pytest.approx(2.0)
    with pytest.raises(VolumeError, match="at least 1"):
        plan(v, factor=0.5)


def test_two_planes_are_fused_by_the_mean_and_slices_have_lr_axis_on_rows() -> None:
    v = _vol(shape=(12, 10, 6), spacing=(1.0, 1.0, 2.0))
    base = reconstruct(v, None).array
    rec = Recorder(residual=0.0)
    same = reconstruct(v, rec).array
    assert np.allclose(same, base, atol=1e-3)
    # plane fixing j: slices (k_out=12, i=12); plane fixing i: (k_out=12, j=10); LR axis (k) first = rows
    assert set(rec.shapes) == {(12, 12), (12, 10)}
    assert len(rec.shapes) == 10 + 12

    class PlaneA(Recorder):  # +0.1 residual on one plane only: the mean gives +0.05 of the range
        def __call__(self, x: np.ndarray) -> np.ndarray:
            self.shapes.append(x.shape)
            return np.full_like(x, 0.6 if x.shape == (12, 12) else 0.5)

    lo, hi = float(v.array.min()), float(v.array.max())
    fused = reconstruct(v, PlaneA(), dtype=np.float32).array
    inside = (base > lo + 0.1 * (hi - lo)) & (base < hi - 0.1 * (hi - lo))
    assert np.allclose((fused - base)[inside], 0.05 * (hi - lo), rtol=1e-3)


def test_int16_ct_round_trips_in_hu_without_values_outside_the_input_range() -> None:
    rng = np.random.default_rng(3)
    hu = rng.integers(-1024, 3000, size=(16, 16, 5)).astype(np.int16)
    v = Volume(hu, np.diag([0.5, 0.5, 2.5, 1]))
    out = reconstruct(v, Recorder(residual=0.4))  # pushes everything up: must be clipped at the input's max
    assert out.array.dtype == np.int16
    assert out.array.min() >= hu.min() and out.array.max() <= hu.max()
    # with a zero residual the acquired slices come back at their centres (r = 5, odd: thin slice 2 of each)
    exact = reconstruct(v, Recorder(0.0)).array
    assert np.abs(exact[:, :, 2::5].astype(int) - hu.astype(int)).max() <= 1


def test_nan_volume_refused_with_its_source() -> None:
    arr = np.ones((6, 6, 4), np.float32)
    arr[1, 2, 3] = np.nan
    v = Volume(arr, np.diag([1, 1, 3.0, 1]))
    v.meta.source = "scan.nii.gz"  # type: ignore[assignment]
    with pytest.raises(VolumeError, match="scan.nii.gz.*NaN"):
        reconstruct(v, None)


def test_large_volumes_go_through_memmaps(monkeypatch, tmp_path) -> None:
    import medsr.volumes.throughplane as tp

    monkeypatch.setattr(tp, "MEMMAP_VOXELS", 100)
    v = _vol(shape=(8, 8, 4), spacing=(1, 1, 2))
    small = reconstruct(v, Recorder(0.0)).array  # memmapped now
    monkeypatch.setattr(tp, "MEMMAP_VOXELS", 10**9)
    ref = reconstruct(v, Recorder(0.0)).array
    assert isinstance(small, np.memmap) and np.allclose(small, ref)


def test_training_degradation_equals_the_evaluation_simulation() -> None:
    """A 2D training pair and the volume simulation are the same operator along the LR axis."""
    vol = np.random.default_rng(4).random((6, 7, 24)).astype(np.float32)
    thick = simulate_thick(vol, 2, 3)
    interp = resample_axis(thick, 2, np.arange(24) / 3, 3)
    sl = vol[2]  # (7, 24): LR axis is the columns -> transpose to rows
    pair_in = degrade_rows(np.ascontiguousarray(sl.T), 3, 3.0, 0)
    assert np.allclose(pair_in.T, interp[2], atol=1e-5)


def test_adaptation_pairs_from_a_sparse_volume_and_a_clear_refusal_for_an_empty_one(tmp_path) -> None:
    """A CT angiography with everything but the vessels at 0 has no slice with 15 % foreground: adaptation
    still finds its slices with signal (it found none before and the trainer failed with an unrelated message)."""
    from medsr.volumes.training import adaptation_pairs, configure_adaptation

    arr = np.zeros((40, 40, 10), np.float32)
    arr[18:21, :, :] = 500.0  # one 'vessel' along j, about 7 % of each k-slice
    arr[5, 5, 5] = 3000.0  # a bright outlier stretches the range, as bone or contrast does
    sparse = Volume(arr, np.diag([0.7, 0.7, 4.0, 1.0]))
    counts = adaptation_pairs(sparse, tmp_path / "pairs", per_axis=4, draws=1)
    assert counts["train"] > 0 and counts["val"] > 0 and counts["axis"] == 2
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.float32), np.diag([1.0, 1.0, 3.0, 1.0])), str(tmp_path / "empty.nii.gz"))
    from medsr.train.config import load_config

    cfg = load_config("mr_through_plane")
    cfg["train"]["out_dir"] = str(tmp_path / "run")
    with pytest.raises(ValueError, match="empty.nii.gz: no in-plane slice holds signal"):
        configure_adaptation(cfg, tmp_path / "empty.nii.gz", 1.0, lambda s: None)


def test_volume_training_pair_counts_follow_the_volumes_config_section(tmp_path) -> None:
    """medsr-train --volumes: [volumes] draws / per_axis set how many pairs are written (per slice and
    direction, one per draw), and the held-out volume's validation pairs do not change with them."""
    import nibabel as nib

    from medsr.train.config import load_config, set_value
    from medsr.volumes.training import configure_volume_training

    data = tmp_path / "vols"
    data.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(rng.random((24, 24, 24)).astype(np.float32), np.eye(4)), str(data / f"{name}.nii.gz"))
    counts = {}
    for draws in (1, 3):
        cfg = load_config("mr_through_plane")
        set_value(cfg, "train.out_dir", str(tmp_path / f"run{draws}"))
        set_value(cfg, "volumes.draws", str(draws))
        set_value(cfg, "volumes.per_axis", "4")
        configure_volume_training(cfg, data, ["b"], lambda m: None)
        pairs = tmp_path / f"run{draws}" / "pairs"
        counts[draws] = (len(list((pairs / "train" / "lr").glob("*.png"))), len(list((pairs / "val" / "lr").glob("*.png"))))
    assert counts[1][0] == 3 * 4 * 2  # 3 axes x 4 slices x 2 directions
    assert counts[3][0] == 3 * counts[1][0]
    assert counts[1][1] == counts[3][1] > 0


def test_a_tilted_volume_gets_its_factor_from_the_distance_between_slice_planes() -> None:
    """Gantry tilt (sheared affine: each 4 mm slice shifted 1.34 mm in-plane, as the real GE series): the
    factor and --spacing use the 4 mm between the slice planes, not the 4.22 mm step between slices, so
    --spacing 1 gives thin slices whose planes are 1 mm apart."""
    aff = np.diag([0.5, 0.5, 4.0, 1.0])
    aff[1, 2] = 1.34  # the slice column leans in y
    vol = Volume(np.zeros((16, 16, 6), np.float32), aff)
    assert vol.spacing[2] == pytest.approx(np.hypot(4.0, 1.34))
    assert vol.plane_distance(2) == pytest.approx(4.0)
    p = plan(vol, target_spacing=1.0)
    assert p.factor == pytest.approx(4.0) and p.n_out == 24
    assert Volume(np.zeros(p.out_shape, np.float32), p.affine_out).plane_distance(2) == pytest.approx(1.0)
    assert plan(vol).factor == pytest.approx(8.0)  # its own ratio: 4 mm over 0.5 mm in-plane
    straight = Volume(np.zeros((16, 16, 6), np.float32), np.diag([0.5, 0.5, 4.0, 1.0]))
    assert straight.plane_distance(2) == straight.spacing[2] == 4.0


def test_volumes_factors_are_validated() -> None:
    from medsr.train.config import ConfigError, load_config, validate

    cfg = load_config("mr_through_plane")
    assert cfg["volumes"]["factors"] == [2, 3, 4, 4] and cfg["volumes"]["consistent"] is True
    cfg["volumes"]["factors"] = [1, 4]
    with pytest.raises(ConfigError, match="volumes.factors"):
        validate(cfg)
