"""Real-ESRGAN degradations, kernels, multi-scale GT and datasets (CPU, tiny tensors)."""

from __future__ import annotations

import copy
import math

import cv2
import numpy as np
import pytest
import torch

from medsr.train import data as D
from medsr.train import kernels as K
from medsr.train.config import DEFAULTS
from medsr.train.degradations import (
    PairPool,
    RealESRGANDegrader,
    USMSharp,
    filter2d,
    jpeg_compress,
    paired_random_crop,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _opts() -> dict:
    return copy.deepcopy(DEFAULTS["degradation"])


@pytest.mark.parametrize("size", [7, 13, 21])
def test_every_kernel_sums_to_one(size: int) -> None:
    rng = np.random.default_rng(0)
    for i, kind in enumerate(K.KERNEL_TYPES):
        prob = [1.0 if j == i else 0.0 for j in range(len(K.KERNEL_TYPES))]
        for _ in range(3):
            k = K.random_mixed_kernel(rng, K.KERNEL_TYPES, prob, size, (0.2, 3.0), (0.5, 4.0), (1.0, 2.0))
            assert k.shape == (size, size), kind
            assert math.isclose(float(k.sum()), 1.0, abs_tol=1e-5), kind
            assert np.all(np.isfinite(k))
    for cutoff in (np.pi / 5, np.pi / 3, np.pi):
        k = K.circular_lowpass_kernel(cutoff, size, pad_to=21)
        assert k.shape == (21, 21)
        assert math.isclose(float(k.sum()), 1.0, abs_tol=1e-5)
    opts = _opts()
    for _ in range(20):
        for k in (K.draw_blur_kernel(rng, opts), K.draw_blur_kernel(rng, opts, True), K.draw_final_sinc(rng, opts)):
            assert k.shape == (21, 21)
            assert math.isclose(float(k.sum()), 1.0, abs_tol=1e-5)


def test_gaussian_kernel_matches_closed_form() -> None:
    k = K.bivariate_gaussian(21, 2.0, 2.0, 0.0)
    g = cv2.getGaussianKernel(21, 2.0)
    np.testing.assert_allclose(k, g @ g.T, atol=1e-6)


def test_filter2d_identity_and_per_sample() -> None:
    x = torch.rand(2, 3, 24, 24)
    pulse = torch.from_numpy(K.pulse_kernel()).expand(2, 21, 21)
    torch.testing.assert_close(filter2d(x, pulse), x)
    box = torch.full((2, 21, 21), 1 / 441)
    assert filter2d(torch.ones(2, 1, 24, 24), box).sub(1).abs().max() < 1e-5


def _batch(b: int, c: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    opts = _opts()
    img = cv2.GaussianBlur(rng.random((size, size, c)).astype(np.float32), (0, 0), 2)
    gt = torch.from_numpy(img.reshape(size, size, c).transpose(2, 0, 1)).clamp(0, 1)
    return {
        "gt": torch.stack([gt.roll(i, dims=1) for i in range(b)]),
        "kernel1": torch.stack([torch.from_numpy(K.draw_blur_kernel(rng, opts)) for _ in range(b)]),
        "kernel2": torch.stack([torch.from_numpy(K.draw_blur_kernel(rng, opts, True)) for _ in range(b)]),
        "sinc": torch.stack([torch.from_numpy(K.draw_final_sinc(rng, opts)) for _ in range(b)]),
    }


def _degrade(batch: dict[str, torch.Tensor], seed: int, scale: int = 4) -> torch.Tensor:
    deg = RealESRGANDegrader(_opts(), scale)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    return deg(batch["gt"], batch["kernel1"], batch["kernel2"], batch["sinc"], rng=rng, gen=gen, usm=USMSharp())


@pytest.mark.parametrize(("channels", "scale"), [(1, 4), (3, 4), (3, 2)])
def test_degradation_shapes_ranges_determinism(channels: int, scale: int) -> None:
    batch = _batch(2, channels, 64, 0)
    outs = [_degrade(batch, s, scale) for s in (1, 1, 2)]
    for lq in outs:
        assert lq.shape == (2, channels, 64 // scale, 64 // scale)
        assert lq.min() >= 0 and lq.max() <= 1
        torch.testing.assert_close(lq * 255, (lq * 255).round(), atol=1e-4, rtol=0)  # 8-bit levels
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_many_seeds_stay_valid_gray() -> None:
    batch = _batch(2, 1, 48, 3)
    for s in range(6):
        lq = _degrade(batch, s)
        assert lq.shape == (2, 1, 12, 12) and torch.isfinite(lq).all()


def test_jpeg_gray_and_colour() -> None:
    x = torch.rand(2, 1, 32, 32)
    y = jpeg_compress(x, torch.tensor([30.0, 95.0]))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).abs().mean() > 0
    x3 = torch.rand(1, 3, 32, 32)
    assert jpeg_compress(x3, torch.tensor([50.0])).shape == x3.shape
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert (jpeg_compress(flat, torch.tensor([95.0])) - 0.5).abs().max() < 3 / 255


def test_usm_keeps_flat_images() -> None:
    flat = torch.full((1, 1, 40, 40), 0.3)
    torch.testing.assert_close(USMSharp()(flat), flat)


def test_paired_crop_and_pool() -> None:
    gt, lq = torch.rand(4, 1, 64, 64), torch.rand(4, 1, 16, 16)
    g2, l2 = paired_random_crop(gt, lq, 32, 4, np.random.default_rng(0))
    assert g2.shape == (4, 1, 32, 32) and l2.shape == (4, 1, 8, 8)
    pool = PairPool(8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        lo, go = pool(l2, g2, gen)
        assert lo.shape == l2.shape and go.shape == g2.shape
    assert pool.ptr == 8


def _write_images(folder, n: int, size: tuple[int, int], dtype=np.uint8, channels: int = 1) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    maxv = np.iinfo(dtype).max
    out = []
    for i in range(n):
        shape = size if channels == 1 else (*size, channels)
        img = (rng.random(shape) * maxv).astype(dtype)
        p = folder / f"img{i}.png"
        cv2.imwrite(str(p), img)
        out.append(p)
    return out


def test_multiscale_counts_and_sizes(tmp_path) -> None:
    src = _write_images(tmp_path / "gt", 2, (600, 450), np.uint16)
    small = _write_images(tmp_path / "small", 1, (120, 90))
    paths = D.generate_multiscale(src, tmp_path / "ms")
    assert len(paths) == 2 * 5  # originals + 0.75, 0.5, 1/3, shortest edge 400
    made = sorted((tmp_path / "ms").glob("00000_*"))
    sizes = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape for p in made]
    assert sizes == [(450, 337), (300, 225), (200, 150), (533, 400)]
    assert cv2.imread(str(made[0]), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert len(D.generate_multiscale(small, tmp_path / "ms2")) == 1 + 3  # no upscale to 400
    meta = D.write_meta_info(paths, tmp_path / "meta_info.txt", tmp_path)
    assert D.read_meta_info(meta, tmp_path) == paths


def test_dataset_crops_kernels_and_sampler(tmp_path) -> None:
    paths = _write_images(tmp_path / "gt", 3, (50, 70), np.uint16)
    dopts = dict(DEFAULTS["data"], crop_pad_size=64, gt_size=32)
    ds = D.RealESRGANDataset(paths, 3, dopts, _opts(), seed=0)
    item = ds[(0, 5, 1)]
    assert item["gt"].shape == (3, 64, 64) and item["gt"].dtype == torch.float32
    assert 0 <= float(item["gt"].min()) and float(item["gt"].max()) <= 1
    assert item["kernel1"].shape == item["kernel2"].shape == item["sinc"].shape == (21, 21)
    assert torch.equal(ds[(0, 5, 1)]["gt"], item["gt"])
    s = D.IterationBatchSampler(3, 2, start=0, total=6, seed=0)
    batches = list(s)
    assert len(batches) == 6 and all(len(b) == 2 for b in batches)
    assert sorted(k[0] for b in batches[:3] for k in b[:]) == [0, 0, 1, 1, 2, 2]  # epoch 0 then 1
    assert list(D.IterationBatchSampler(3, 2, start=4, total=6, seed=0)) == batches[4:]


def test_paired_dataset(tmp_path) -> None:
    hr = _write_images(tmp_path / "hr", 2, (64, 64), channels=3)
    (tmp_path / "lr").mkdir()
    for p in hr:
        cv2.imwrite(str(tmp_path / "lr" / p.name), cv2.resize(cv2.imread(str(p)), (16, 16), interpolation=cv2.INTER_AREA))
    ds = D.PairedDataset(tmp_path / "hr", tmp_path / "lr", 4, 3, dict(DEFAULTS["data"], gt_size=32), seed=0)
    item = ds[(1, 0, 0)]
    assert item["gt"].shape == (3, 32, 32) and item["lq"].shape == (3, 8, 8)
