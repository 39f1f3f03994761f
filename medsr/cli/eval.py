"""medsr-eval: the paper's protocol on a folder of ground-truth images, models judged against bicubic."""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Any

import click

from medsr.eval.baselines import BASELINES
from medsr.eval.protocol import DEFAULT_SIGMA, ProtocolConfig, evaluate, iter_folder, list_images


def _load(spec: str, engine: bool, **kw: Any) -> tuple[str, Any]:
    from medsr.api import Upscaler

    up = Upscaler.from_engine(spec, **kw) if engine else Upscaler.from_pretrained(spec, **kw)
    label = getattr(up, "model_id", None) or Path(spec).stem
    if Path(spec).exists():  # a file: make the label tell which one
        stem = Path(spec).stem
        label = stem if label in (None, "custom") else (label if stem in label else f"{stem} ({label})")
    return label, up


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--scale", type=click.IntRange(1, 8), default=4, show_default=True, help="Downsampling / SR factor.")
@click.option("--model", "models", multiple=True,
              help="Registered model name or weights file (.pth/.safetensors/.param); repeatable.")
@click.option("--engine", "engines", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Engine or model file (.onnx, .plan); repeatable.")
@click.option("--sigma", type=click.FloatRange(min=0), default=DEFAULT_SIGMA, show_default=True,
              help="Gaussian blur sigma in LR pixels after bicubic downsampling (0: none).")
@click.option("--kernel-size", type=int, default=None, help="Odd Gaussian kernel size [default: 2*ceil(3*sigma)+1].")
@click.option("--down", type=click.Choice(["matlab", "cv2"]), default="matlab", show_default=True,
              help="Bicubic downsampling: antialiased MATLAB imresize (BasicSR) or cv2.INTER_CUBIC.")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Resize ground truth to SIZE x SIZE first (default: native size).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images (sorted).")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(list(BASELINES)),
              help="Baselines to run (repeatable; default all; bicubic is always run).")
@click.option("--crop-border", type=click.IntRange(min=0), default=None, help="Metric border crop [default: scale].")
@click.option("--no-quantize", is_flag=True, help="Keep LR/SR in float instead of rounding to the source bit depth.")
@click.option("--no-lpips", is_flag=True, help="Skip LPIPS even when the lpips package is available.")
@click.option("--tile", type=int, default=None, help="LR tile edge in pixels for the models.")
@click.option("--overlap", type=int, default=None, help="LR pixels shared by neighbouring tiles.")
@click.option("--batch", type=int, default=None, help="Tiles per backend call.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp32", show_default=True,
              help="int8: an int8-quantized OpenVINO IR given with --engine (medsr-export --openvino-int8).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: runs/eval-<date>-<time>].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def main(data_dir: Path, scale: int, models: tuple[str, ...], engines: tuple[str, ...], sigma: float,
         kernel_size: int | None, down: str, size: int | None, limit: int | None, baselines: tuple[str, ...],
         crop_border: int | None, no_quantize: bool, no_lpips: bool, tile: int | None, overlap: int | None,
         batch: int | None, device: str, precision: str, out_dir: Path | None, quiet: bool) -> None:
    """Degrade DATA_DIR's images (bicubic down + Gaussian blur), super-resolve with each --model/--engine
    and the interpolation baselines, and report PSNR/SSIM (gray/Y, border crop = scale) vs bicubic.

    Writes results.csv, summary.md and figure.png to --out and prints the summary table.
    """
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        raise click.BadParameter("must be odd and positive", param_hint="--kernel-size")
    paths = list_images(data_dir, limit)
    if not paths:
        raise click.UsageError(f"no images (png/jpg/tif/bmp/dcm) in {data_dir}")
    config = ProtocolConfig(
        scale=scale, sigma=sigma, kernel_size=kernel_size, down=down, size=size, crop_border=crop_border,
        quantize=not no_quantize, baselines=tuple(baselines) or tuple(BASELINES), lpips=not no_lpips,
    )
    kw = dict(device=device, precision=precision, tile=tile, overlap=overlap, batch=batch)
    loaded: list[tuple[str, Any]] = []
    for spec, is_engine in [(m, False) for m in models] + [(e, True) for e in engines]:
        try:
            label, up = _load(spec, is_engine, **kw)
        except Exception as e:  # one clear line: missing weights, bad file, unavailable runtime
            click.echo(f"medsr-eval: cannot load {spec}: {e}", err=True)
            sys.exit(2)
        if getattr(up, "scale", scale) != scale:
            click.echo(f"medsr-eval: {spec} is a x{up.scale} model, the protocol is --scale {scale}", err=True)
            sys.exit(2)
        loaded.append((label, up))

    out = out_dir or Path("runs") / f"eval-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    result = evaluate(iter_folder(paths), loaded, config, progress=not quiet, total=len(paths))

    from medsr.eval.report import markdown_table, write_reports

    extra = [f"Data: {data_dir} ({len(paths)} images). Models: "
             + (", ".join(f"{lbl} ({getattr(u, 'model_id', '?')})" for lbl, u in loaded) or "none (baselines only)")
             + f". Device {device}, precision {precision}."]
    written = write_reports(result, out, extra=extra)
    click.echo(f"\n{config.describe()}\n")
    click.echo(markdown_table(result))
    click.echo("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":  # pragma: no cover
    main()
