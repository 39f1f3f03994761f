"""Training configuration: nested dict defaults (Real-ESRGAN's), TOML files and ``key=value`` overrides.

Defaults follow ``options/train_realesrgan_x4plus.yml`` and ``RealESRGANDataset`` of Real-ESRGAN.
A config file only lists what it changes. Shipped configs live in ``medsr/train/configs/*.toml`` and
are found by name (``cxr_x4``) or by path.
"""

from __future__ import annotations

import copy
import math
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

KERNELS = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
KERNEL_PROB = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]

DEFAULTS: dict[str, Any] = {
    "name": "realesrgan",
    "model": {
        "scale": 4,
        "channels": 3,  # 1: gray model (a 3-channel pretrained G/D is folded to gray)
        "num_feat": 64,
        "num_block": 23,
        "num_grow_ch": 32,
        # "none": Real-ESRGAN's generator | "bicubic": output = bicubic upscale + network (from-scratch
        # fidelity models: training starts at bicubic's quality; arch/rrdbnet.py)
        "skip": "none",
        # the call contract recorded with the weights ("" = plain super-resolution; the volume path's models:
        # medsr/volumes/throughplane.py)
        "contract": "",
        "pretrained": "realesrgan-x4plus",  # registry name or path (params_ema); "" = from scratch
        "pretrained_d": "",  # path to the official RealESRGAN_x4plus_netD.pth; "" = D from scratch
        "d_num_feat": 64,
        "d_skip_connection": True,
    },
    "data": {
        # "realesrgan": Real-ESRGAN's high-order degradations on the fly | "classical": downscale + blur + mild
        # noise (section [classical]) | "paired": HR + LR folders
        "mode": "realesrgan",
        "train_dir": "",
        "lq_dir": "",  # paired mode only
        "val_dir": "",  # HR validation images (LR made by bicubic downscale) or a folder with hr/ and lr/
        "meta_info": "",  # optional index file (one GT path per line, relative to train_dir)
        "multiscale": False,  # generate the 4 Lanczos downscales (T0..T3) once before training
        "multiscale_sizes": [],  # with multiscale: also Lanczos resizes to exactly N x N (e.g. [512]: a protocol's GT)
        "min_foreground": 0.0,  # redraw crops with less than this share of non-black pixels (fundus surround)
        "gt_size": 256,
        "crop_pad_size": 400,  # Real-ESRGAN crops/pads GT to 400 before degrading, then crops gt_size
        "use_hflip": True,
        "use_rot": False,
        "num_workers": 4,
        "val_max_images": 10,
        "val_max_size": 512,  # validation: centre crop of at most this size (HR pixels)
        "val_split": 0,  # hold out this many training originals (seeded) for validation when no val_dir
        "val_degradation": "bicubic",  # LR of HR-only validation images: "bicubic" | "protocol" (eval protocol)
        "val_resize": 0,  # > 0: resize validation HR to N x N (Lanczos) before the centre crop (retina protocol)
    },
    "volumes": {  # medsr-train --volumes: self-supervised pairs (medsr/volumes/training.py make_pairs)
        "per_axis": 24,  # slices per volume axis
        "draws": 2,  # degradations drawn per slice and direction
        "factors": [2, 3, 4],  # training pairs draw r from these (repeat one to weight it)
        "consistent": False,  # inputs projected onto the acquired slices (model contract v2)
    },
    "classical": {  # data.mode = "classical" (medsr/train/classical.py); sigma/noise in LR pixels / 8-bit levels
        "down": ["bicubic", "area", "bilinear"],  # bicubic = antialiased MATLAB imresize
        "down_prob": [0.6, 0.2, 0.2],
        "blur_prob": 0.9,
        "blur_sigma": [0.2, 1.6],
        "noise_prob": 0.3,
        "poisson_prob": 0.3,  # share of noisy samples that get Poisson instead of Gaussian noise
        "noise_sigma": [0.0, 2.0],
        "poisson_scale": [0.0, 0.5],
        "jpeg_prob": 0.0,
        "jpeg_range": [85, 95],
        "quantize": True,
    },
    "degradation": {
        "blur_kernel_size": 21,
        "kernel_list": KERNELS,
        "kernel_prob": KERNEL_PROB,
        "sinc_prob": 0.1,
        "blur_sigma": [0.2, 3.0],
        "betag_range": [0.5, 4.0],
        "betap_range": [1.0, 2.0],
        "kernel_list2": KERNELS,
        "kernel_prob2": KERNEL_PROB,
        "sinc_prob2": 0.1,
        "blur_sigma2": [0.2, 1.5],
        "betag_range2": [0.5, 4.0],
        "betap_range2": [1.0, 2.0],
        "final_sinc_prob": 0.8,
        "resize_prob": [0.2, 0.7, 0.1],  # up, down, keep
        "resize_range": [0.15, 1.5],
        "gaussian_noise_prob": 0.5,
        "noise_range": [1.0, 30.0],
        "poisson_scale_range": [0.05, 3.0],
        "gray_noise_prob": 0.4,
        "jpeg_range": [30.0, 95.0],
        "second_blur_prob": 0.8,
        "resize_prob2": [0.3, 0.4, 0.3],
        "resize_range2": [0.3, 1.2],
        "gaussian_noise_prob2": 0.5,
        "noise_range2": [1.0, 25.0],
        "poisson_scale_range2": [0.05, 2.5],
        "gray_noise_prob2": 0.4,
        "jpeg_range2": [30.0, 95.0],
        "queue_size": 180,  # training-pair pool that mixes degradations across batches; 0 = off
    },
    "train": {
        "total_iter": 400000,
        "batch_size": 12,
        "seed": 0,
        "lr_g": 1e-4,
        "lr_d": 1e-4,
        "lr_schedule": "constant",  # "constant" | "cosine" (to lr_min at the last iteration; stateless, resume-exact)
        "lr_min": 1e-6,
        "betas": [0.9, 0.99],
        "ema_decay": 0.999,
        # EMA decay min(ema_decay, (1 + it) / (10 + it)): without it a from-scratch run keeps 0.999^N of its
        # random init in the EMA weights (N = 5000: 0.7%), which a deep net amplifies into a dark, wrong output
        "ema_warmup": True,
        "pixel_weight": 1.0,
        "perceptual_weight": 1.0,
        "gan_weight": 0.1,
        "layer_weights": {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0},
        "l1_gt_usm": True,
        "percep_gt_usm": True,
        "gan_gt_usm": False,
        "net_d_init_iters": 0,
        "pretrain_l1_iters": 0,  # optional L1-only stage (Real-ESRNet / PSNR model) before the GAN stage
        "vgg_path": "",  # torchvision-format VGG19 weights; "" = perceptual term off
        "amp": "auto",  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
        "channels_last": True,
        "compile": False,
        "device": "auto",
        "val_every": 1000,
        "save_every": 2000,
        "log_every": 50,
        "keep_checkpoints": 2,
        "out_dir": "runs",
        "time_limit_min": 0.0,  # stop (checkpoint + weights) after this many minutes of training; 0 = no limit
        # the saved weights are the EMA generator at its best validation PSNR (the starting weights, scored at
        # iteration 0, included) instead of the last: per-volume adaptation, whose own validation peaks early
        "keep_best": False,
    },
}


class ConfigError(ValueError):
    """A config file or override is invalid."""


def _merge(base: dict[str, Any], upd: dict[str, Any], where: str = "") -> None:
    for k, v in upd.items():
        key = f"{where}{k}"
        if k not in base:
            raise ConfigError(f"unknown config key {key!r}")
        if isinstance(base[k], dict) and k != "layer_weights":
            if not isinstance(v, dict):
                raise ConfigError(f"config key {key!r} is a section")
            _merge(base[k], v, key + ".")
        else:
            base[k] = v


def config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    shipped = resources.files("medsr.train") / "configs" / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise ConfigError(f"no shipped config named {name_or_path!r} (shipped: {', '.join(shipped_configs())})")
    return Path(str(shipped))


def shipped_configs() -> list[str]:
    d = resources.files("medsr.train") / "configs"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml"))


def load_config(name_or_path: str | None = None) -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS)
    if name_or_path:
        with open(config_path(name_or_path), "rb") as f:
            _merge(cfg, tomllib.load(f))
    return cfg


def _parse_value(text: str, old: Any) -> Any:
    t = text.strip()
    if isinstance(old, bool):
        if t.lower() in ("1", "true", "yes", "on"):
            return True
        if t.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(old, int):
        try:
            return int(t)
        except ValueError:
            f = float(t)
            if not f.is_integer():
                raise ConfigError(f"expected an integer, got {text!r}") from None
            return int(f)
    if isinstance(old, float):
        return float(t)
    if isinstance(old, (list, dict)):
        try:
            return tomllib.loads(f"v = {t}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"cannot parse {text!r} as a TOML value: {e}") from e
    return t


def set_value(cfg: dict[str, Any], dotted: str, text: str) -> None:
    """Apply ``section.key=value`` (or a bare ``key`` when it names exactly one key)."""
    parts = dotted.strip().split(".")
    if len(parts) == 1:
        hits = [s for s, v in cfg.items() if isinstance(v, dict) and parts[0] in v]
        if len(hits) != 1:
            raise ConfigError(f"{dotted!r}: use section.key ({'ambiguous' if hits else 'unknown key'})")
        parts = [hits[0], parts[0]]
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown config section in {dotted!r}")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {dotted!r}")
    node[parts[-1]] = _parse_value(text, node[parts[-1]])


def validate(cfg: dict[str, Any]) -> None:
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    if m["scale"] not in (1, 2, 4):
        raise ConfigError("model.scale must be 1, 2 or 4")
    if m["channels"] not in (1, 3):
        raise ConfigError("model.channels must be 1 or 3")
    if m["skip"] not in ("none", "bicubic"):
        raise ConfigError("model.skip must be 'none' or 'bicubic'")
    vf = cfg["volumes"]["factors"]
    if not vf or any(not isinstance(f, int) or not 2 <= f <= 8 for f in vf):
        raise ConfigError("volumes.factors must list integer factors between 2 and 8")
    if d["mode"] not in ("realesrgan", "classical", "paired"):
        raise ConfigError("data.mode must be 'realesrgan', 'classical' or 'paired'")
    if d["val_degradation"] not in ("bicubic", "protocol"):
        raise ConfigError("data.val_degradation must be 'bicubic' or 'protocol'")
    if not 0.0 <= float(d["min_foreground"]) <= 1.0:
        raise ConfigError("data.min_foreground must be a fraction in [0, 1]")
    if any(int(n) < 1 for n in d["multiscale_sizes"]):
        raise ConfigError("data.multiscale_sizes must list positive sizes")
    if t["lr_schedule"] not in ("constant", "cosine"):
        raise ConfigError("train.lr_schedule must be 'constant' or 'cosine'")
    from medsr.train.classical import validate_opts

    try:
        validate_opts(cfg["classical"])
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if d["gt_size"] % (4 * m["scale"]) and d["gt_size"] % m["scale"]:
        raise ConfigError("data.gt_size must be a multiple of the scale")
    if d["crop_pad_size"] < d["gt_size"]:
        d["crop_pad_size"] = d["gt_size"]
    if t["amp"] not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError("train.amp must be auto, bf16, fp16 or off")
    for k in ("total_iter", "batch_size"):
        if t[k] < 1:
            raise ConfigError(f"train.{k} must be positive")
    if not math.isclose(sum(cfg["degradation"]["resize_prob"]), 1.0, abs_tol=1e-6):
        raise ConfigError("degradation.resize_prob must sum to 1")
