"""medsr-train: fine-tune Real-ESRGAN on a folder of medical images (shipped configs or a TOML file)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from medsr.cli.options import LogOptions, device_option, logging_options, output_option

TINY = {"num_block": "1", "num_feat": "8", "num_grow_ch": "4", "d_num_feat": "8"}


def _parse_pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise click.BadParameter(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", default=None,
              help="Shipped config name (listed by --list-configs) or a .toml path [default: cxr_x4; mr_through_plane with "
                   "--volumes/--adapt].")
@click.option("--data", type=click.Path(exists=True, file_okay=False), help="Folder of ground-truth (HR) images.")
@click.option("--val", type=click.Path(exists=True, file_okay=False), help="Validation folder (HR images, or hr/ + lr/).")
@click.option("--max-iters", type=int, help="Total iterations of the GAN stage (train.total_iter).")
@click.option("--batch", type=int, help="Batch size.")
@click.option("--crop", type=int, help="GT crop size in HR pixels (data.gt_size).")
@device_option(default=None, help="auto, cpu, cuda or cuda:N [default: the config's train.device].")
@output_option(help="Run folder [default: runs/<config name>].", path_type=str)
@click.option("--resume", type=click.Path(exists=True), help="Checkpoint file or run folder to resume from.")
@click.option("--vgg", type=click.Path(exists=True, dir_okay=False),
              help="torchvision-format VGG19 weights (vgg19-dcbb9e9d.pth) for the perceptual loss.")
@click.option("--pretrained", help="Pretrained generator: registered name or weights path.")
@click.option("--from-scratch", is_flag=True, help="Random-init generator instead of the pretrained one.")
@click.option("--model-override", help="Comma-separated model keys, e.g. num_block=1,num_feat=8,num_grow_ch=4.")
@click.option("--tiny", is_flag=True, help="Tiny networks, 64-px crops, no workers: smoke tests only.")
@click.option("--set", "sets", multiple=True, help="Any config key: section.key=value (repeatable).")
@click.option("--list-configs", is_flag=True, help="List the shipped configs and exit.")
@click.option("--volumes", type=click.Path(exists=True, file_okay=False),
              help="Train a through-plane volume model on the (near) isotropic NIfTI/MGZ volumes in this folder.")
@click.option("--holdout", multiple=True, help="With --volumes: a volume (file stem) held out for validation.")
@click.option("--adapt", type=click.Path(exists=True),
              help="Per-volume adaptation: fine-tune the through-plane model on this scan's own in-plane slices.")
@click.option("--minutes", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="With --adapt: how long to fine-tune.")
@logging_options
def main(
    config: str | None, data: str | None, val: str | None, max_iters: int | None, batch: int | None,
    crop: int | None, device: str | None, output: str | None, resume: str | None, vgg: str | None,
    pretrained: str | None, from_scratch: bool, model_override: str | None, tiny: bool, sets: tuple[str, ...],
    list_configs: bool, volumes: str | None, holdout: tuple[str, ...], adapt: str | None, minutes: float,
    log: LogOptions,
) -> None:
    """Fine-tune a Real-ESRGAN generator (with U-Net discriminator) and save the EMA generator as medsr weights."""
    out = output
    from medsr.train.config import ConfigError, load_config, set_value, shipped_configs, validate

    if list_configs:
        for name in shipped_configs():
            click.echo(name)
        return
    if volumes and adapt:
        raise click.UsageError("--volumes (train a model) and --adapt (fine-tune on one scan) exclude each other")
    if config is None:
        config = "mr_through_plane" if (volumes or adapt) else "cxr_x4"
    try:
        cfg = load_config(config)
        if tiny:
            for k, v in TINY.items():
                set_value(cfg, f"model.{k}", v)
            cfg["data"]["gt_size"] = min(int(cfg["data"]["gt_size"]), 64)
            cfg["data"]["crop_pad_size"] = min(int(cfg["data"]["crop_pad_size"]), 64)
            cfg["data"]["num_workers"] = 0
            cfg["data"]["val_max_size"] = 64
            cfg["degradation"]["queue_size"] = 0
            cfg["train"].update(log_every=5, val_every=10, save_every=10)
        for k, v in _parse_pairs(model_override or ""):
            set_value(cfg, f"model.{k}", v)
        opts = {
            "data.train_dir": data, "data.val_dir": val, "train.total_iter": max_iters, "train.batch_size": batch,
            "data.gt_size": crop, "train.device": device, "train.out_dir": out, "train.vgg_path": vgg,
            "model.pretrained": pretrained,
        }
        for k, v in opts.items():
            if v is not None:
                set_value(cfg, k, str(v))
        for s in sets:
            if "=" not in s:
                raise ConfigError(f"--set expects section.key=value, got {s!r}")
            k, v = s.split("=", 1)
            set_value(cfg, k, v)
        if out is None:
            cfg["train"]["out_dir"] = str(Path("runs") / cfg["name"])
        validate(cfg)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e

    from medsr.train.trainer import Trainer, TrainingError

    def say(msg: str) -> None:  # the training log (losses, validation): kept with -q, which stops the bars
        click.echo(msg, err=True)

    if volumes or adapt:
        from medsr.volumes import VolumeError
        from medsr.volumes.training import configure_adaptation, configure_volume_training

        try:
            if volumes:
                configure_volume_training(cfg, volumes, holdout, say)
            else:
                configure_adaptation(cfg, adapt, minutes, say)
                from_scratch = False
        except (VolumeError, ValueError, OSError) as e:
            click.echo(f"medsr-train: error: {e}", err=True)
            sys.exit(2)

    try:
        trainer = Trainer(cfg, log=say, from_scratch=from_scratch)
        if resume:
            trainer.load_checkpoint(resume)
        result = trainer.fit(progress=log.progress)
    except (TrainingError, FileNotFoundError, ValueError) as e:
        click.echo(f"medsr-train: error: {e}", err=True)
        sys.exit(2)
    click.echo(f"weights: {result.weights}")
    if result.checkpoint is not None:
        click.echo(f"checkpoint: {result.checkpoint}")
    if result.val:
        click.echo(f"validation: PSNR {result.val['psnr']:.3f} dB, SSIM {result.val['ssim']:.4f}")


if __name__ == "__main__":  # pragma: no cover
    main()
