"""Real-ESRGAN fine-tuning loop: G (RRDBNet) + U-Net D, L1 + perceptual + GAN, EMA, AMP, exact resume.

Mirrors ``RealESRGANModel.optimize_parameters``: G is updated with ``pixel_weight * L1(out, gt_usm) +
perceptual(out, gt_usm) + gan_weight * BCE(D(out), real)`` while D is frozen, then D with
``BCE(D(gt), real)`` and ``BCE(D(out.detach()), fake)``; the EMA copy of G (decay 0.999) is what
is validated and finally saved. An optional first stage (``pretrain_l1_iters``) trains G with L1
only (Real-ESRNet, the PSNR-oriented model) before the GAN stage.
"""

from __future__ import annotations

import copy
import csv
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from medsr.arch import RRDBNet, fold_to_gray
from medsr.eval.metrics import psnr, ssim
from medsr.train import data as D
from medsr.train.degradations import PairPool, RealESRGANDegrader, USMSharp, paired_random_crop
from medsr.train.losses import PerceptualLoss, gan_loss
from medsr.train.networks import UNetDiscriminatorSN, adapt_discriminator_state

LOSS_KEYS = ("l_pix", "l_percep", "l_g_gan", "l_d_real", "l_d_fake")


class TrainingError(RuntimeError):
    """Training cannot start (missing data, weights, incompatible checkpoint); the message says why."""


@dataclass
class TrainResult:
    out_dir: Path
    weights: Path
    checkpoint: Path | None
    iterations: int
    val: dict[str, float]


def resolve_device(name: str) -> torch.device:
    """The runtime's device rule (:func:`medsr.runtime.backend.resolve_device`), as a TrainingError."""
    from medsr.runtime.backend import BackendError
    from medsr.runtime.backend import resolve_device as _resolve

    try:
        return _resolve(name)
    except BackendError as e:
        raise TrainingError(str(e)) from None


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None if amp in ("auto", "off") else torch.bfloat16 if amp == "bf16" else None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def init_rrdb_(model: RRDBNet, scale: float = 0.1) -> None:
    """BasicSR ``default_init_weights``: Kaiming-normal scaled by 0.1 for every conv, zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            m.weight.data.mul_(scale)
            if m.bias is not None:
                m.bias.data.zero_()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    st: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_states(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    from medsr.fsutil import atomic_write_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    def __init__(self, cfg: dict[str, Any], log: Callable[[str], None] = print, from_scratch: bool = False) -> None:
        self.cfg = cfg
        self.log = log
        m, t = cfg["model"], cfg["train"]
        self.device = resolve_device(t["device"])
        self.amp = amp_dtype(t["amp"], self.device)
        self.seed = int(t["seed"])
        _seed_everything(self.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.scale = int(m["scale"])
        self.channels = int(m["channels"])
        self.out_dir = Path(t["out_dir"])
        self.mf = torch.channels_last if (t["channels_last"] and self.device.type == "cuda") else torch.contiguous_format

        self.net_g = self._build_g(from_scratch).to(self.device, memory_format=self.mf).train()
        self.net_g_ema = copy.deepcopy(self.net_g).eval().requires_grad_(False)
        self.gan_weight = float(t["gan_weight"])
        self.use_gan = self.gan_weight > 0
        self.net_d: UNetDiscriminatorSN | None = None
        if self.use_gan:
            self.net_d = self._build_d().to(self.device, memory_format=self.mf).train()
        # forward callables (torch.compile'd on CUDA when asked; state dicts stay on the plain modules)
        self.g_fwd: Callable[[torch.Tensor], torch.Tensor] = self.net_g
        self.d_fwd: Callable[[torch.Tensor], torch.Tensor] | None = self.net_d
        if t["compile"] and self.device.type == "cuda":
            self.g_fwd = torch.compile(self.net_g)  # type: ignore[assignment]
            if self.net_d is not None:
                self.d_fwd = torch.compile(self.net_d)  # type: ignore[assignment]
        betas = tuple(t["betas"])
        self.opt_g = torch.optim.Adam(self.net_g.parameters(), lr=t["lr_g"], betas=betas, weight_decay=0)
        self.opt_d = (
            torch.optim.Adam(self.net_d.parameters(), lr=t["lr_d"], betas=betas, weight_decay=0) if self.net_d else None
        )
        fp16 = self.amp == torch.float16
        self.scaler_g = torch.amp.GradScaler("cuda", enabled=fp16)
        self.scaler_d = torch.amp.GradScaler("cuda", enabled=fp16)

        self.percep: PerceptualLoss | None = None
        if float(t["perceptual_weight"]) > 0:
            if t["vgg_path"]:
                self.percep = PerceptualLoss(t["layer_weights"], t["vgg_path"], float(t["perceptual_weight"]))
                self.percep.to(self.device, memory_format=self.mf)
                log(f"perceptual loss: VGG19 {', '.join(t['layer_weights'])} from {t['vgg_path']}")
            else:
                log(
                    "perceptual loss OFF: no VGG19 weights given (--vgg PATH, torchvision vgg19 state dict); "
                    "they cannot be downloaded here. Training uses L1 + GAN only."
                )
        self.usm = USMSharp().to(self.device)
        self.degrader = RealESRGANDegrader(cfg["degradation"], self.scale)
        self.pool = PairPool(int(cfg["degradation"]["queue_size"]) if cfg["data"]["mode"] == "realesrgan" else 0)
        self.iteration = 0
        self.total = int(t["pretrain_l1_iters"]) + int(t["total_iter"])
        self.holdout: list[Path] = []
        self.dataset = self._build_dataset()
        dcfg = cfg["data"]
        val_src: Any = dcfg["val_dir"] or self.holdout
        self.val = (
            D.load_validation(val_src, self.scale, self.channels, dcfg["val_max_images"], dcfg["val_max_size"], dcfg["val_degradation"],
                              int(dcfg["val_resize"]))
            if val_src
            else []
        )
        # the unsharp-masked GT is only worth computing when an active loss uses it
        gan_or_percep = self.use_gan or self.percep is not None
        self.need_usm = bool(t["l1_gt_usm"]) or (gan_or_percep and (bool(t["percep_gt_usm"]) or bool(t["gan_gt_usm"])))
        self._tb: Any = None

    # ------------------------------------------------------------------ building
    def _build_g(self, from_scratch: bool) -> RRDBNet:
        m = self.cfg["model"]
        spec = str(m["pretrained"] or "")
        if spec and not from_scratch:
            try:
                from medsr.weights import load_model

                loaded = load_model(spec)
            except Exception as e:  # no network, unknown name, corrupt file
                raise TrainingError(
                    f"pretrained generator {spec!r} could not be loaded: {e}\n"
                    "Give --pretrained PATH to a local RealESRGAN .pth, or --from-scratch to train from random init."
                ) from e
            g = loaded.model
            if m["skip"] != g.skip:
                raise TrainingError(f"pretrained {spec!r} has skip {g.skip!r}, the config says model.skip={m['skip']!r}")
            if g.scale != self.scale:
                raise TrainingError(f"pretrained {spec!r} is x{g.scale}, the config trains x{self.scale}")
            if g.num_in_ch == 3 and self.channels == 1:
                g = fold_to_gray(g)
                self.log(f"generator: {loaded.model_id} folded to 1 channel (exact gray equivalent)")
            elif g.num_in_ch != self.channels:
                raise TrainingError(f"pretrained {spec!r} has {g.num_in_ch} channels, the config {self.channels}")
            for k in ("num_feat", "num_block", "num_grow_ch"):
                if getattr(g, k) != int(m[k]):
                    self.log(f"generator: {k}={getattr(g, k)} from the pretrained weights (config said {m[k]})")
            self.log(f"generator: {loaded.model_id} ({loaded.source}, sha256 {loaded.sha256[:12]})")
            if m.get("contract"):  # the config says what the trained model's input and output mean
                g.contract = str(m["contract"])
            return g.float()
        g = RRDBNet(self.channels, self.channels, self.scale, int(m["num_feat"]), int(m["num_block"]), int(m["num_grow_ch"]), m["skip"],
                    str(m.get("contract", "")))
        init_rrdb_(g)
        self.log(
            f"generator: from scratch (num_feat={g.num_feat}, num_block={g.num_block}, num_grow_ch={g.num_grow_ch}, skip={g.skip})"
        )
        return g

    def _build_d(self) -> UNetDiscriminatorSN:
        m = self.cfg["model"]
        d = UNetDiscriminatorSN(self.channels, int(m["d_num_feat"]), bool(m["d_skip_connection"]))
        if m["pretrained_d"]:
            p = Path(m["pretrained_d"]).expanduser()
            if not p.is_file():
                raise TrainingError(f"pretrained discriminator not found: {p}")
            sd = torch.load(p, map_location="cpu", weights_only=True)
            d.load_state_dict(adapt_discriminator_state(sd, self.channels))
            self.log(f"discriminator: {p}")
        else:
            self.log("discriminator: from scratch (no --set model.pretrained_d=PATH)")
        return d

    def _build_dataset(self) -> torch.utils.data.Dataset:
        dcfg = self.cfg["data"]
        if not dcfg["train_dir"]:
            raise TrainingError("no training data: give --data DIR")
        root = Path(dcfg["train_dir"])
        if dcfg["mode"] == "paired":
            if not dcfg["lq_dir"]:
                raise TrainingError("paired mode needs data.lq_dir (--set data.lq_dir=DIR)")
            ds = D.PairedDataset(root, dcfg["lq_dir"], self.scale, self.channels, dcfg, self.seed)
            self.log(f"data: {len(ds)} HR/LR pairs (paired mode)")
            return ds
        if dcfg["meta_info"]:
            paths = D.read_meta_info(dcfg["meta_info"], root)
        else:
            paths = D.list_images(root)
            if not paths:
                raise TrainingError(f"no images in {root}")
            if int(dcfg["val_split"]) > 0 and not dcfg["val_dir"]:
                paths, self.holdout = D.split_holdout(paths, int(dcfg["val_split"]), self.seed)
                D.write_meta_info(self.holdout, self.out_dir / "val_holdout.txt", root)
                self.log(f"data: {len(self.holdout)} originals held out for validation (val_holdout.txt)")
            if dcfg["multiscale"]:
                n = len(paths)
                paths = D.generate_multiscale(
                    paths, self.out_dir / "gt_multiscale", extra_sizes=[int(n) for n in dcfg["multiscale_sizes"]]
                )
                self.log(f"data: multi-scale GT {n} originals + {len(paths) - n} Lanczos downscales")
            D.write_meta_info(paths, self.out_dir / "meta_info.txt", root)
        if dcfg["mode"] == "classical":
            self.log(f"data: {len(paths)} GT images, classical degradation, GT crops {dcfg['gt_size']}")
            return D.ClassicalDataset(paths, self.scale, self.channels, dcfg, self.cfg["classical"], self.seed)
        self.log(f"data: {len(paths)} GT images, crops {dcfg['crop_pad_size']} -> {dcfg['gt_size']}")
        return D.RealESRGANDataset(paths, self.channels, dcfg, self.cfg["degradation"], self.seed)

    def _loader(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        t, dcfg = self.cfg["train"], self.cfg["data"]
        sampler = D.IterationBatchSampler(len(self.dataset), int(t["batch_size"]), start, self.total, self.seed)  # type: ignore[arg-type]
        nw = int(dcfg["num_workers"])
        kw: dict[str, Any] = {"num_workers": nw, "pin_memory": self.device.type == "cuda"}
        if nw > 0:
            kw.update(persistent_workers=False, prefetch_factor=4)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, **kw))

    # ------------------------------------------------------------------ one step
    def _autocast(self) -> Any:
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def prepare_batch(self, batch: dict[str, torch.Tensor], it: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LQ, GT and USM-sharpened GT on the device for iteration ``it`` (degradations seeded by it)."""
        dev = self.device
        gt = batch["gt"].to(dev, non_blocking=True)
        if "lq" in batch:
            lq = batch["lq"].to(dev, non_blocking=True)
        else:
            rng = np.random.default_rng([self.seed, it, 4])
            gen = torch.Generator(device=dev).manual_seed(self.seed * 1_000_003 + it)
            ks = [batch[k].to(dev, non_blocking=True) for k in ("kernel1", "kernel2", "sinc")]
            lq = self.degrader(gt, *ks, rng=rng, gen=gen, usm=self.usm)
            gt, lq = paired_random_crop(gt, lq, int(self.cfg["data"]["gt_size"]), self.scale, rng)
            lq, gt = self.pool(lq.contiguous(), gt.contiguous(), gen)
        if self.need_usm:
            with torch.no_grad():
                gt_usm = self.usm(gt)
        else:
            gt_usm = gt
        return (
            lq.contiguous(memory_format=self.mf),
            gt.contiguous(memory_format=self.mf),
            gt_usm.contiguous(memory_format=self.mf),
        )

    def train_step(self, lq: torch.Tensor, gt: torch.Tensor, gt_usm: torch.Tensor, it: int) -> dict[str, torch.Tensor]:
        t = self.cfg["train"]
        gan_stage = self.use_gan and it >= int(t["pretrain_l1_iters"])
        l1_gt = gt_usm if t["l1_gt_usm"] else gt
        percep_gt = gt_usm if t["percep_gt_usm"] else gt
        gan_gt = gt_usm if t["gan_gt_usm"] else gt
        losses: dict[str, torch.Tensor] = {}
        self._set_lr(it)
        d = self.d_fwd
        if self.net_d is not None:
            self.net_d.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.g_fwd(lq)
        update_g = not gan_stage or it - int(t["pretrain_l1_iters"]) >= int(t["net_d_init_iters"])
        if update_g:
            with self._autocast():
                l_pix = F.l1_loss(out.float(), l1_gt) * float(t["pixel_weight"])
                total = l_pix
                losses["l_pix"] = l_pix.detach()
                if self.percep is not None and gan_stage:
                    l_p = self.percep(out, percep_gt)
                    total = total + l_p
                    losses["l_percep"] = l_p.detach()
                if gan_stage and d is not None:
                    l_g = gan_loss(d(out), True) * self.gan_weight
                    total = total + l_g
                    losses["l_g_gan"] = l_g.detach()
            self.scaler_g.scale(total).backward()
            self.scaler_g.step(self.opt_g)
            self.scaler_g.update()
        if gan_stage and d is not None and self.net_d is not None and self.opt_d is not None:
            self.net_d.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            with self._autocast():
                l_real = gan_loss(d(gan_gt), True)
            self.scaler_d.scale(l_real).backward()
            with self._autocast():
                l_fake = gan_loss(d(out.detach().clone()), False)
            self.scaler_d.scale(l_fake).backward()
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
            losses["l_d_real"] = l_real.detach()
            losses["l_d_fake"] = l_fake.detach()
        decay = float(t["ema_decay"])
        if t["ema_warmup"]:
            decay = min(decay, (1.0 + it) / (10.0 + it))
        self.update_ema(decay)
        return losses

    def lr_at(self, it: int, base: float) -> float:
        t = self.cfg["train"]
        if t["lr_schedule"] != "cosine" or self.total <= 1:
            return base
        lo = float(t["lr_min"])
        return lo + 0.5 * (base - lo) * (1.0 + math.cos(math.pi * min(it, self.total - 1) / (self.total - 1)))

    def _set_lr(self, it: int) -> None:
        t = self.cfg["train"]
        for opt, base in ((self.opt_g, float(t["lr_g"])), (self.opt_d, float(t["lr_d"]))):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = self.lr_at(it, base)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        ema = [p for p in self.net_g_ema.parameters()]
        cur = [p.detach() for p in self.net_g.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - decay)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "net_g": self.net_g.state_dict(),
            "net_g_ema": self.net_g_ema.state_dict(),
            "net_d": self.net_d.state_dict() if self.net_d is not None else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "pool": self.pool.state_dict(),
            "rng": rng_states(),
            "config": self.cfg,
        }

    def save_checkpoint(self) -> Path:
        ck = self.out_dir / "checkpoints"
        path = ck / f"iter_{self.iteration:07d}.pt"
        _atomic_save(self.state_dict(), path)
        _atomic_save({"path": path.name}, ck / "latest.pt")
        keep = int(self.cfg["train"]["keep_checkpoints"])
        old = sorted(ck.glob("iter_*.pt"))[:-keep] if keep > 0 else []
        for p in old:
            p.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / "checkpoints" / "latest.pt" if (p / "checkpoints").is_dir() else p / "latest.pt"
        if not p.is_file():
            raise TrainingError(f"checkpoint not found: {p}")
        ck = torch.load(p, map_location="cpu", weights_only=False)
        if "path" in ck and "net_g" not in ck:
            p = p.parent / ck["path"]
            ck = torch.load(p, map_location="cpu", weights_only=False)
        try:
            self.net_g.load_state_dict(ck["net_g"])
            self.net_g_ema.load_state_dict(ck["net_g_ema"])
            if self.net_d is not None and ck["net_d"] is not None:
                self.net_d.load_state_dict(ck["net_d"])
        except RuntimeError as e:
            raise TrainingError(f"{p} does not match the configured networks: {str(e)[:300]}") from e
        self.opt_g.load_state_dict(ck["opt_g"])
        if self.opt_d is not None and ck["opt_d"] is not None:
            self.opt_d.load_state_dict(ck["opt_d"])
        self.scaler_g.load_state_dict(ck["scaler_g"])
        self.scaler_d.load_state_dict(ck["scaler_d"])
        self.pool.load_state_dict(ck["pool"], self.device)
        set_rng_states(ck["rng"])
        self.iteration = int(ck["iteration"])
        self.log(f"resumed from {p} at iteration {self.iteration}")

    # ------------------------------------------------------------------ validation / logging
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.val:
            return {}
        g = self.net_g_ema
        r = g.unshuffle
        ps, ss = [], []
        for _, lr, hr in self.val:
            x = torch.from_numpy(lr.transpose(2, 0, 1)).unsqueeze(0).to(self.device)
            h, w = x.shape[-2:]
            ph, pw = (-h) % r, (-w) % r
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            y = g(x.contiguous(memory_format=self.mf))  # fp32: metrics must not see bf16 rounding
            y = y.float().clamp(0, 1)[0, :, : h * self.scale, : w * self.scale].permute(1, 2, 0).cpu().numpy()
            hr = hr[: y.shape[0], : y.shape[1]]
            ps.append(psnr(y, hr, crop=self.scale))
            ss.append(ssim(y, hr, crop=self.scale))
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))}

    def validate_bicubic(self) -> dict[str, float]:
        """The bicubic baseline (OpenCV, as ``medsr-eval``'s ``bicubic`` row) on the validation pairs: the
        number a fidelity model's validation PSNR/SSIM must beat."""
        from medsr.eval.baselines import upscale_baseline

        ps, ss = [], []
        for _, lr, hr in self.val:
            h, w = lr.shape[:2]
            y = upscale_baseline(lr, "bicubic", (h * self.scale, w * self.scale)).reshape(h * self.scale, w * self.scale, -1)
            hr = hr[: y.shape[0], : y.shape[1]]
            ps.append(psnr(y, hr, crop=self.scale))
            ss.append(ssim(y, hr, crop=self.scale))
        return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))} if ps else {}

    def _csv(self, name: str, row: dict[str, Any]) -> None:
        p = self.out_dir / name
        new = not p.exists()
        with p.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def _scalar(self, tag: str, value: float, it: int) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except Exception:
                self._tb = False
        if self._tb:
            self._tb.add_scalar(tag, value, it)

    # ------------------------------------------------------------------ loop
    def fit(self, progress: bool = True) -> TrainResult:
        from tqdm import tqdm

        t = self.cfg["train"]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_every, val_every, save_every = int(t["log_every"]), int(t["val_every"]), int(t["save_every"])
        self.log(
            f"training x{self.scale} {self.channels}-channel on {self.device} (amp {self.amp or 'off'}, "
            f"{'channels_last' if self.mf == torch.channels_last else 'contiguous'}): iterations {self.iteration}..{self.total}, "
            f"batch {t['batch_size']}, GT crop {self.cfg['data']['gt_size']}"
        )
        if self.iteration >= self.total:
            self.log("nothing to do: the checkpoint is already at the last iteration")
        # x1 models (the through-plane residual contract) have no bicubic counterpart: their targets are residuals
        if self.val and self.iteration == 0 and self.scale > 1:
            base = self.validate_bicubic()
            self._csv("val_log.csv", {"iter": "bicubic", **base})
            self.log(f"validation baseline (bicubic): PSNR {base['psnr']:.3f} dB, SSIM {base['ssim']:.4f}")
        keep_best = bool(t.get("keep_best")) and bool(self.val)
        best: tuple[dict[str, float], int, dict[str, torch.Tensor]] | None = None
        if keep_best:
            start = self.validate()
            self.log(f"validation at the start (iteration {self.iteration}): PSNR {start['psnr']:.3f} dB")
            best = (start, self.iteration, self._ema_state())
        loader = self._loader(self.iteration)
        sums: dict[str, torch.Tensor] = {}
        n_sum = 0
        last_val: dict[str, float] = {}
        ckpt: Path | None = None
        bar = tqdm(total=self.total, initial=self.iteration, disable=not progress, dynamic_ncols=True, unit="it")
        t0, it0 = time.perf_counter(), self.iteration
        limit_s = float(t["time_limit_min"]) * 60.0
        t_start = time.perf_counter()
        for batch in loader:
            it = self.iteration
            lq, gt, gt_usm = self.prepare_batch(batch, it)
            losses = self.train_step(lq, gt, gt_usm, it)
            for k, v in losses.items():
                sums[k] = sums.get(k, torch.zeros((), device=v.device)) + v.float()
            n_sum += 1
            self.iteration = it + 1
            bar.update(1)
            if self.iteration % log_every == 0 or self.iteration == self.total:
                dt = time.perf_counter() - t0
                speed = (self.iteration - it0) / dt if dt > 0 else 0.0
                row: dict[str, Any] = {"iter": self.iteration}
                for k in LOSS_KEYS:
                    row[k] = float(sums[k]) / n_sum if k in sums else ""
                row["it_s"] = round(speed, 3)
                self._csv("train_log.csv", row)
                for k in LOSS_KEYS:
                    if row[k] != "":
                        self._scalar(f"train/{k}", row[k], self.iteration)
                bar.set_postfix({k: f"{row[k]:.4f}" for k in LOSS_KEYS if row[k] != ""} | {"it/s": f"{speed:.2f}"})
                sums, n_sum = {}, 0
                t0, it0 = time.perf_counter(), self.iteration
            if self.val and (self.iteration % val_every == 0 or self.iteration == self.total):
                last_val = self.validate()
                self._csv("val_log.csv", {"iter": self.iteration, **last_val})
                for k, v in last_val.items():
                    self._scalar(f"val/{k}", v, self.iteration)
                bar.write(f"iter {self.iteration}: val PSNR {last_val['psnr']:.3f} dB, SSIM {last_val['ssim']:.4f}")
                if best is not None and last_val["psnr"] > best[0]["psnr"]:
                    best = (last_val, self.iteration, self._ema_state())
            if self.iteration == int(t["pretrain_l1_iters"]) and self.iteration < self.total:
                self._save_weights(self.out_dir / f"{self.cfg['name']}_psnr.pth", stage="l1")
            timed_out = limit_s > 0 and time.perf_counter() - t_start >= limit_s
            if self.iteration % save_every == 0 or self.iteration == self.total or timed_out:
                ckpt = self.save_checkpoint()
            if timed_out:
                self.log(f"time limit of {t['time_limit_min']:g} min reached at iteration {self.iteration}")
                if self.val and self.iteration % val_every:
                    last_val = self.validate()
                    self._csv("val_log.csv", {"iter": self.iteration, **last_val})
                    if best is not None and last_val["psnr"] > best[0]["psnr"]:
                        best = (last_val, self.iteration, self._ema_state())
                break
        bar.close()
        if self.iteration == self.total and ckpt is None:
            ckpt = self.save_checkpoint()
        if best is not None:
            self.net_g_ema.load_state_dict(best[2])
            self.log(f"keeping the best validation: iteration {best[1]} of {self.iteration}, PSNR {best[0]['psnr']:.3f} dB")
            last_val = best[0]
        weights = self._save_weights(self.out_dir / f"{self.cfg['name']}.pth", stage="gan" if self.use_gan else "l1")
        if self._tb:
            self._tb.close()
        return TrainResult(self.out_dir, weights, ckpt, self.iteration, last_val)

    def _ema_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net_g_ema.state_dict().items()}

    def _save_weights(self, path: Path, stage: str) -> Path:
        from medsr.weights import save_weights

        t = self.cfg["train"]
        extra = {
            "training": {
                "config": self.cfg["name"],
                "iterations": self.iteration,
                "stage": stage,
                "ema_decay": t["ema_decay"],
                "weights": {"pixel": t["pixel_weight"], "perceptual": t["perceptual_weight"] if self.percep else 0.0, "gan": self.gan_weight},
                "pretrained": self.cfg["model"]["pretrained"],
            }
        }
        digest = save_weights(self.net_g_ema.float().cpu(), path, self.cfg["name"], extra)
        self.net_g_ema.to(self.device, memory_format=self.mf)
        self.log(f"saved EMA generator: {path} (sha256 {digest[:12]})")
        return path


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


__all__ = ["TrainResult", "Trainer", "TrainingError", "n_params"]
