"""Training data: GT image index, multi-scale GT generation, random crops, degradation kernels, batches.

Everything random is derived from ``(seed, iteration, slot)``: the sample a slot sees, its crop, flips
and blur kernels. A run resumed at iteration N therefore sees exactly the batches an uninterrupted
run would, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medsr.io.image import SUPPORTED_SUFFIXES
from medsr.train import kernels as K
from medsr.train.classical import classical_degrade, margin

MULTISCALE_SCALES = (0.75, 0.5, 1 / 3)
MULTISCALE_SHORTEST_EDGE = 400
#: A pixel is foreground when the mean of its channels exceeds this (fraction of full scale): 10/255
#: clears the near-black surround of a fundus photograph (JPEG noise there stays below ~6/255).
FOREGROUND_LEVEL = 10.0 / 255.0
FOREGROUND_TRIES = 10


def foreground_fraction(img: np.ndarray) -> float:
    """Share of pixels whose channel mean exceeds ``FOREGROUND_LEVEL`` (uint8, uint16 or float in [0, 1])."""
    x = np.asarray(img)
    maxv = 255.0 if x.dtype == np.uint8 else 65535.0 if x.dtype == np.uint16 else 1.0
    m = x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2, dtype=np.float32) / maxv
    return float((m > FOREGROUND_LEVEL).mean())


def list_images(folder: str | Path) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder not found: {d}")
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)


def write_meta_info(paths: Sequence[Path], meta_file: str | Path, root: str | Path | None = None) -> Path:
    """Index file as BasicSR's ``meta_info``: one GT path per line (relative to ``root`` when given)."""
    meta = Path(meta_file)
    meta.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for p in paths:
        p = Path(p)
        lines.append(str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else str(p))
    meta.write_text("\n".join(lines) + "\n")
    return meta


def read_meta_info(meta_file: str | Path, root: str | Path) -> list[Path]:
    out = []
    for line in Path(meta_file).read_text().splitlines():
        line = line.strip().split(" ")[0] if line.strip() else ""
        if line:
            p = Path(line)
            out.append(p if p.is_absolute() else Path(root) / p)
    return out


def _read_float(path: Path) -> tuple[np.ndarray, int]:
    """Float32 H x W x C in [0, 1] (MONOCHROME2 polarity, RGB order) and the stored bit depth (8 or 16)."""
    try:
        from medsr.io.image import read_image, to_float
    except ImportError:  # pragma: no cover - medsr.io is part of the package
        read_image = None
    if read_image is not None:
        img = read_image(path)
        return to_float(img), 8 if img.max_value <= 255 else 16
    px = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if px is None:
        raise ValueError(f"cannot read image {path}")
    if px.ndim == 3:
        px = px[:, :, 2::-1]
    else:
        px = px[:, :, None]
    maxv = 65535.0 if px.dtype == np.uint16 else 255.0
    return np.clip(px.astype(np.float32) / maxv, 0, 1), 16 if px.dtype == np.uint16 else 8


def read_gt(path: str | Path, channels: int) -> np.ndarray:
    """A float32 H x W x ``channels`` image in [0, 1] (8/16-bit aware; gray <-> RGB as needed)."""
    x, _ = _read_float(Path(path))
    if x.shape[2] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=2)
    elif x.shape[2] >= 3 and channels == 1:
        x = (x[:, :, 0] * 0.299 + x[:, :, 1] * 0.587 + x[:, :, 2] * 0.114)[:, :, None]
    elif x.shape[2] > channels:
        x = x[:, :, :channels]
    return np.ascontiguousarray(x, dtype=np.float32)


def generate_multiscale(
    src: Sequence[Path], dst_dir: str | Path, overwrite: bool = False, extra_sizes: Sequence[int] = ()
) -> list[Path]:
    """Real-ESRGAN's multi-scale GT (``scripts/generate_multiscale_DF2K.py``).

    For every image writes Lanczos downscales by 0.75, 0.5 and 1/3 (``<stem>T0..T2.png``) and one whose
    shortest edge is 400 px (``<stem>T3.png``, only when that is a downscale: BasicSR would upscale
    smaller images, which adds no real detail to a GT); with the originals the GT set is 5x larger. Bit depth
    and channel count are kept (16-bit PNG for 16-bit input). OpenCV's Lanczos-4 stands in for PIL's
    Lanczos. Returns the originals followed by the generated files.

    ``extra_sizes`` (``data.multiscale_sizes``): for every N, one more Lanczos resize to exactly N x N
    (``<stem>S<N>.png``, antialiased Lanczos-3 as ``medsr.eval.baselines.lanczos_resize``; the aspect ratio is not kept, as an evaluation protocol that resizes the whole
    image to N x N does, e.g. the retina protocol's 512 x 512), written only when it is a downscale of
    both edges.
    """
    out_dir = Path(dst_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    for i, p in enumerate(src):
        x, bits = _read_float(Path(p))
        maxv = 255.0 if bits == 8 else 65535.0
        px = np.round(x * maxv).astype(np.uint8 if bits == 8 else np.uint16)
        if px.shape[2] == 1:
            px = px[:, :, 0]
        h, w = px.shape[:2]
        sizes = [(int(w * s), int(h * s)) for s in MULTISCALE_SCALES]
        if min(h, w) > MULTISCALE_SHORTEST_EDGE:  # never an upscale (BasicSR would upscale small images)
            if w < h:
                sizes.append((MULTISCALE_SHORTEST_EDGE, int(MULTISCALE_SHORTEST_EDGE * h / w)))
            else:
                sizes.append((int(MULTISCALE_SHORTEST_EDGE * w / h), MULTISCALE_SHORTEST_EDGE))
        names = [f"T{idx}" for idx in range(len(sizes))]
        for n in extra_sizes:
            if int(n) < min(h, w):
                sizes.append((int(n), int(n)))
                names.append(f"S{int(n)}")
        for tag, (nw, nh) in zip(names, sizes, strict=True):
            q = out_dir / f"{i:05d}_{Path(p).stem}{tag}.png"
            if overwrite or not q.exists():
                if tag.startswith("S"):  # the protocol's resampler (antialiased Lanczos-3), same rounding
                    from medsr.eval.baselines import lanczos_resize

                    r = lanczos_resize(px.astype(np.float64), (nh, nw))
                    r = np.clip(np.round(r), 0, maxv).astype(px.dtype)
                else:
                    r = cv2.resize(px, (max(1, nw), max(1, nh)), interpolation=cv2.INTER_LANCZOS4)
                if r.ndim == 3:
                    r = r[:, :, 2::-1]
                cv2.imwrite(str(q), np.ascontiguousarray(r))
            made.append(q)
    return [Path(p) for p in src] + made


def _augment(imgs: list[np.ndarray], rng: np.random.Generator, hflip: bool, rot: bool) -> list[np.ndarray]:
    """BasicSR ``augment``: horizontal flip, and with ``rot`` vertical flip and transpose (8 orientations)."""
    hf = hflip and rng.uniform() < 0.5
    vf = rot and rng.uniform() < 0.5
    tr = rot and rng.uniform() < 0.5
    out = []
    for x in imgs:
        if hf:
            x = x[:, ::-1]
        if vf:
            x = x[::-1]
        if tr:
            x = x.transpose(1, 0, 2)
        out.append(np.ascontiguousarray(x))
    return out


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    h, w = x.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        x = cv2.copyMakeBorder(x, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)
        if x.ndim == 2:
            x = x[:, :, None]
    return x


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


SampleKey = tuple[int, int, int]  # (image index, iteration, slot in the batch)


class RealESRGANDataset(Dataset):
    """GT crops (``crop_pad_size``, padded when smaller) with the three degradation kernels per sample."""

    def __init__(self, paths: Sequence[Path], channels: int, data_opts: dict[str, Any], deg_opts: dict[str, Any], seed: int) -> None:
        if not paths:
            raise ValueError("no training images")
        self.paths = list(paths)
        self.channels = channels
        self.d = data_opts
        self.k = deg_opts
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        idx, it, slot = key
        rng = np.random.default_rng([self.seed, it, slot, 1])
        img = read_gt(self.paths[idx], self.channels)
        size = int(self.d["crop_pad_size"])
        img = _pad_to(img, size)
        h, w = img.shape[:2]
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        img = img[top : top + size, left : left + size]
        (img,) = _augment([img], rng, self.d["use_hflip"], self.d["use_rot"])
        return {
            "gt": _to_tensor(img),
            "kernel1": torch.from_numpy(K.draw_blur_kernel(rng, self.k)),
            "kernel2": torch.from_numpy(K.draw_blur_kernel(rng, self.k, second=True)),
            "sinc": torch.from_numpy(K.draw_final_sinc(rng, self.k)),
        }


class ClassicalDataset(Dataset):
    """GT crops of ``gt_size`` and their LR made by the classical degradation (``classical.py``), on the host.

    Decoded GT images are kept in memory (as stored: uint8/uint16), so an epoch decodes each file
    once per process; a CPU run with ``num_workers = 0`` then spends its time in the network, not in
    PNG decoding. The crop carries a margin of LR pixels on every side that is cut after degrading.
    """

    def __init__(self, paths: Sequence[Path], scale: int, channels: int, data_opts: dict[str, Any],
                 opts: dict[str, Any], seed: int) -> None:
        if not paths:
            raise ValueError("no training images")
        self.paths = list(paths)
        self.scale, self.channels, self.d, self.opts, self.seed = scale, channels, data_opts, opts, seed
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, idx: int) -> np.ndarray:
        img = self._cache.get(idx)
        if img is None:
            x = read_gt(self.paths[idx], self.channels)
            # 8-bit sources are cached as uint8 (exact, half the memory of uint16: 34 RGB fundus
            # photographs of 3410 x 2848 and their downscales hold ~1.7 GB instead of ~3.4 GB)
            q = np.round(x * 255.0)
            if np.abs(q - x * 255.0).max() < 1e-3:
                img = q.astype(np.uint8)
            else:
                img = np.round(x * 65535.0).astype(np.uint16)
            self._cache[idx] = img
        return img

    def _crop_origin(self, img: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left of a random ``size``^2 crop; with ``data.min_foreground`` > 0, crops whose share of
        foreground pixels (mean over channels above ``FOREGROUND_LEVEL``) is below it are redrawn, up to
        ``FOREGROUND_TRIES`` times (then the best draw is kept), so that a fundus photograph's black
        surround does not fill batches with flat black pairs."""
        h, w = img.shape[:2]
        need = float(self.d.get("min_foreground", 0.0) or 0.0)
        best, best_f = (0, 0), -1.0
        for _ in range(FOREGROUND_TRIES if need > 0 else 1):
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            if need <= 0:
                return top, left
            f = foreground_fraction(img[top : top + size, left : left + size])
            if f >= need:
                return top, left
            if f > best_f:
                best, best_f = (top, left), f
        return best

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        idx, it, slot = key
        rng = np.random.default_rng([self.seed, it, slot, 5])
        s, gs = self.scale, int(self.d["gt_size"])
        m = margin(self.opts)
        size = gs + 2 * m * s
        img = self._image(idx)
        h, w = img.shape[:2]
        if h < size or w < size:
            img = _pad_to(img, size)
            h, w = img.shape[:2]
        top, left = self._crop_origin(img, size, rng)
        maxv = 255.0 if img.dtype == np.uint8 else 65535.0
        crop = img[top : top + size, left : left + size].astype(np.float32) / maxv
        (crop,) = _augment([crop], rng, self.d["use_hflip"], self.d["use_rot"])
        lq = classical_degrade(crop, s, self.opts, rng)[m:-m, m:-m]
        gt = crop[m * s : m * s + gs, m * s : m * s + gs]
        return {"gt": _to_tensor(gt), "lq": _to_tensor(lq)}


class PairedDataset(Dataset):
    """The paper's alternative: real HR/LR pairs (same file stems in two folders), aligned random crops."""

    def __init__(self, hr_dir: str | Path, lq_dir: str | Path, scale: int, channels: int, data_opts: dict[str, Any], seed: int) -> None:
        hr = {p.stem: p for p in list_images(hr_dir)}
        lq = {p.stem: p for p in list_images(lq_dir)}
        common = sorted(set(hr) & set(lq))
        if not common:
            raise ValueError(f"no images with the same name in {hr_dir} and {lq_dir}")
        self.pairs = [(hr[s], lq[s]) for s in common]
        self.scale = scale
        self.channels = channels
        self.d = data_opts
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: SampleKey) -> dict[str, torch.Tensor]:
        idx, it, slot = key
        rng = np.random.default_rng([self.seed, it, slot, 2])
        gt = read_gt(self.pairs[idx][0], self.channels)
        lq = read_gt(self.pairs[idx][1], self.channels)
        s, gs = self.scale, int(self.d["gt_size"])
        ls = gs // s
        if gt.shape[0] != lq.shape[0] * s or gt.shape[1] != lq.shape[1] * s:
            raise ValueError(f"{self.pairs[idx][0].name}: HR {gt.shape[:2]} is not {s}x LR {lq.shape[:2]}")
        lq = _pad_to(lq, ls)
        gt = _pad_to(gt, gs)
        h, w = lq.shape[:2]
        top, left = int(rng.integers(0, h - ls + 1)), int(rng.integers(0, w - ls + 1))
        lq = lq[top : top + ls, left : left + ls]
        gt = gt[top * s : top * s + gs, left * s : left * s + gs]
        gt, lq = _augment([gt, lq], rng, self.d["use_hflip"], self.d["use_rot"])
        return {"gt": _to_tensor(gt), "lq": _to_tensor(lq)}


class IterationBatchSampler(Sampler[list[SampleKey]]):
    """Batches for iterations ``start .. total-1``; epoch ``e`` visits the images in permutation(seed, e)."""

    def __init__(self, n: int, batch_size: int, start: int, total: int, seed: int) -> None:
        self.n, self.b, self.start, self.total, self.seed = n, batch_size, start, total, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, k: int) -> int:
        epoch = k // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 3]).permutation(self.n))
        return int(self._perm[1][k % self.n])

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for it in range(self.start, self.total):
            yield [(self._index(it * self.b + j), it, j) for j in range(self.b)]


def load_validation(
    val: str | Path | Sequence[Path], scale: int, channels: int, max_images: int, max_size: int, degradation: str = "bicubic",
    resize: int = 0,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, LR, HR) float arrays for validation.

    ``val`` is a folder of HR images, a folder with ``hr/`` + ``lr/``, or a list of HR paths (a held-out
    split). LR of HR-only images: a centre crop of at most ``max_size`` px degraded by ``degradation``:
    ``"bicubic"`` (OpenCV bicubic) or ``"protocol"`` (the evaluation protocol: MATLAB bicubic, Gaussian
    blur sigma 1.0, 8-bit; ``medsr.eval.protocol.degrade``). ``resize`` > 0 (``data.val_resize``) first
    resizes each HR image to ``resize`` x ``resize`` with Lanczos and 8-bit rounding, as the retina
    protocol makes its ground truth (``medsr.eval.protocol.prepare_gt``).
    """
    if degradation not in ("bicubic", "protocol"):
        raise ValueError(f"data.val_degradation must be 'bicubic' or 'protocol', got {degradation!r}")
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    if isinstance(val, (str, Path)):
        d = Path(val)
        if (d / "hr").is_dir() and (d / "lr").is_dir():
            lq = {p.stem: p for p in list_images(d / "lr")}
            for p in list_images(d / "hr")[:max_images]:
                if p.stem in lq:
                    pairs.append((p.stem, read_gt(lq[p.stem], channels), read_gt(p, channels)))
            return pairs
        paths = list_images(d)
    else:
        paths = [Path(p) for p in val]
    for p in paths[:max_images]:
        hr = read_gt(p, channels)
        if resize > 0:
            from medsr.eval.protocol import prepare_gt, quantize

            hr = quantize(prepare_gt(hr, scale, resize, resample="lanczos"), 255)
        h, w = hr.shape[:2]
        ch, cw = min(h, max_size), min(w, max_size)
        ch, cw = ch - ch % scale, cw - cw % scale
        top, left = (h - ch) // 2, (w - cw) // 2
        hr = np.ascontiguousarray(hr[top : top + ch, left : left + cw])
        if degradation == "protocol":
            from medsr.eval.protocol import degrade

            lr = degrade(hr, scale, levels=255)
        else:
            lr = cv2.resize(hr, (cw // scale, ch // scale), interpolation=cv2.INTER_CUBIC)
        if lr.ndim == 2:
            lr = lr[:, :, None]
        pairs.append((p.stem, np.clip(lr, 0, 1), hr))
    return pairs


def split_holdout(paths: Sequence[Path], n: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, held-out): ``n`` originals drawn by a seeded permutation, before any multi-scale copies."""
    paths = list(paths)
    if n <= 0:
        return paths, []
    if n >= len(paths):
        raise ValueError(f"data.val_split={n} leaves no training images (found {len(paths)})")
    order = np.random.default_rng([seed, 7]).permutation(len(paths))
    held = sorted(int(i) for i in order[:n])
    hs = set(held)
    return [p for i, p in enumerate(paths) if i not in hs], [paths[i] for i in held]
