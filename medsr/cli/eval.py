"""medsr-eval: the paper's protocol on a folder of ground-truth images, models judged against bicubic."""

from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any

import click

from medsr.cli.options import (
    LogOptions,
    logging_options,
    model_options,
    output_option,
    runtime_options,
    tiling_options,
)
from medsr.eval.baselines import BASELINES
from medsr.eval.protocol import (
    DEFAULT_SIGMA,
    ProtocolConfig,
    evaluate,
    iter_folder,
    list_images,
    retina_config,
)
from medsr.weights.registry import DEFAULT_MODEL

#: The retina protocol's comparator (the paper ran Real-ESRGAN x4plus at x2 output); "not available" when
#: its weights are not on this machine (they cannot be downloaded here).
RETINA_COMPARATOR = "realesrgan-x4plus"


class AtOutscale:
    """Run an x``model.scale`` upscaler and resize its output to x``scale`` with Lanczos-4, as Real-ESRGAN's
    ``inference_realesrgan.py --outscale`` does (the paper's "Real-ESRGAN x4plus at x2")."""

    def __init__(self, up: Any, scale: int) -> None:
        from medsr.eval.protocol import as_sr_function

        self.inner, self.scale = as_sr_function(up), scale
        self.model_id = f"{getattr(up, 'model_id', '?')} at x{scale} output"

    def up(self, lr: Any) -> Any:
        import cv2
        import numpy as np

        out = np.asarray(self.inner(lr), dtype=np.float32)
        h, w = lr.shape[0] * self.scale, lr.shape[1] * self.scale
        r = cv2.resize(out, (w, h), interpolation=cv2.INTER_LANCZOS4)
        return r.reshape(h, w, -1)


def _load(spec: str, **kw: Any) -> tuple[str, Any]:
    """The model as medsr-infer loads it (:meth:`medsr.Upscaler.load`: same runtime and precision rule)."""
    from medsr.api import Upscaler

    up = Upscaler.load(spec, **kw)
    label = getattr(up, "model_id", None) or Path(spec).stem
    if Path(spec).exists():  # a file: make the label tell which one
        stem = Path(spec).stem
        label = stem if label in (None, "custom") else (label if stem in label else f"{stem} ({label})")
    return label, up


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--protocol", type=click.Choice(["paper", "retina"]), default="paper", show_default=True,
              help="paper: the CXR protocol (native size, gray/Y metrics). retina: GT = image resized to 512x512 "
                   "(antialiased Lanczos), x2, metrics on RGB, vessel PSNR and vessel figure, baselines bicubic + "
                   f"Lanczos, plus {RETINA_COMPARATOR} at x2 output when its weights are available.")
@click.option("--scale", type=click.IntRange(1, 8), default=None, help="Downsampling / SR factor [default: 4; retina: 2].")
@click.option("--no-comparator", is_flag=True, help=f"retina: leave out the {RETINA_COMPARATOR} row.")
@model_options(multiple=True, model_help=f"Registered model name or weights file (.pth/.safetensors/.param) "
               f"[default: {DEFAULT_MODEL}, unless --engine or --baselines-only is given].")
@click.option("--baselines-only", is_flag=True, help="Evaluate the interpolation baselines only (no model).")
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
@tiling_options()
@runtime_options()
@output_option(help="Output folder [default: runs/eval-<date>-<time>].")
@logging_options
@click.option("--volumes", is_flag=True,
              help="DATA_DIR holds (near) isotropic NIfTI/MGZ volumes: simulate thick slices, score through-plane "
                   "reconstructions (docs/volumes.md); --model defaults to medsr-mr-tp.")
@click.option("--factor", "factors", multiple=True, type=click.IntRange(2, 8),
              help="Volumes: slice-thickness factors to simulate (repeatable) [default: 2 and 4].")
@click.option("--axis", type=click.IntRange(0, 2), default=2, show_default=True,
              help="Volumes: the voxel axis made thick.")
def main(data_dir: Path, protocol: str, scale: int | None, no_comparator: bool, models: tuple[str, ...],
         engines: tuple[str, ...], baselines_only: bool,
         sigma: float, kernel_size: int | None, down: str, size: int | None, limit: int | None,
         baselines: tuple[str, ...], crop_border: int | None, no_quantize: bool, no_lpips: bool, tile: int | None,
         overlap: int | None, batch: int | None, runtime: str, device: str, precision: str | None,
         output: Path | None, log: LogOptions, volumes: bool, factors: tuple[int, ...], axis: int) -> None:
    """Degrade DATA_DIR's images (bicubic down + Gaussian blur), super-resolve with each --model/--engine
    and the interpolation baselines, and report PSNR/SSIM (gray/Y, border crop = scale) vs bicubic.

    Without --model/--engine the default model is evaluated, loaded as medsr-infer loads it. "s/img" is the
    upscale call alone; the run's wall time per image (model load, reading, degradation, metrics included) is
    printed under the table.
    Writes results.csv, summary.md and figure.png to -o and prints the summary table.
    """
    if volumes:
        _volumes(data_dir, () if baselines_only else models, factors or (2, 4), axis, output, runtime, device,
                 precision, tile, overlap, batch)
        return
    t_start = time.perf_counter()
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        raise click.BadParameter("must be odd and positive", param_hint="--kernel-size")
    paths = list_images(data_dir, limit)
    if not paths:
        raise click.UsageError(f"no images (png/jpg/tif/bmp/dcm) in {data_dir}")
    common = dict(sigma=sigma, kernel_size=kernel_size, down=down, crop_border=crop_border,
                  quantize=not no_quantize, lpips=not no_lpips)
    if protocol == "retina":
        if scale not in (None, 2) or size not in (None, 512):
            raise click.UsageError("--protocol retina is x2 on 512x512 ground truth: leave out --scale/--size")
        config = retina_config(baselines=tuple(baselines) or ("bicubic", "lanczos"), **common)
    else:
        config = ProtocolConfig(scale=scale or 4, size=size, baselines=tuple(baselines) or tuple(BASELINES), **common)
    scale = config.scale
    if baselines_only and (models or engines):
        raise click.UsageError("--baselines-only evaluates no model: drop --model/--engine")
    kw = dict(runtime=runtime, device=device, precision=precision, tile=tile, overlap=overlap, batch=batch)
    loaded: list[tuple[str, Any]] = []
    unavailable: dict[str, str] = {}
    from medsr.weights import MODELS, is_shipped

    retina_default = [n for n in ("medsr-retina-x2",) if is_shipped(MODELS[n])]  # evaluated once it ships
    default = retina_default if protocol == "retina" else [DEFAULT_MODEL]
    chosen = [] if baselines_only else list(models) + list(engines) or default
    specs = [(m, False) for m in chosen]
    if protocol == "retina" and not no_comparator and not baselines_only and RETINA_COMPARATOR not in models:
        specs.append((RETINA_COMPARATOR, True))
    for spec, optional in specs:
        try:
            label, up = _load(spec, **kw)
        except Exception as e:  # one clear line: missing weights, bad file, unavailable runtime
            if optional:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                unavailable[f"{spec} (x4 at x2 output)"] = why[:160]
                click.echo(f"medsr-eval: {spec}: not available ({why[:160]})", err=True)
                continue
            click.echo(f"medsr-eval: cannot load {spec}: {e}", err=True)
            sys.exit(2)
        up_scale = getattr(up, "scale", scale)
        if up_scale != scale and protocol == "retina" and up_scale > scale and up_scale % scale == 0:
            up = AtOutscale(up, scale)
            label = f"{label} (x{up_scale} at x{scale} output)"
        elif up_scale != scale:
            click.echo(f"medsr-eval: {spec} is a x{up_scale} model, the protocol is --scale {scale}", err=True)
            sys.exit(2)
        loaded.append((label, up))

    out = output or Path("runs") / f"eval-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    result = evaluate(iter_folder(paths), loaded, config, progress=log.progress, total=len(paths), unavailable=unavailable)

    from medsr.eval.report import markdown_table, write_reports

    extra = [f"Data: {data_dir} ({len(paths)} images). Models: "
             + (", ".join(f"{lbl} ({getattr(u, 'model_id', '?')})" for lbl, u in loaded) or "none (baselines only)")
             + f". Runtime {runtime}, device {device}, precision {precision or 'the runtime default'}."]
    written = write_reports(result, out, extra=extra)
    click.echo(f"\n{config.describe()}\n")
    click.echo(markdown_table(result))
    wall = time.perf_counter() - t_start
    click.echo(f"wall time: {wall:.1f} s for {len(paths)} image(s), {wall / len(paths):.2f} s per image including "
               "model load, reading, degradation, every method and the metrics (s/img above: the upscale call only)")
    click.echo("wrote " + ", ".join(str(p) for p in written.values()))


def _volumes(data_dir: Path, models: tuple[str, ...], factors: tuple[int, ...], axis: int, out_dir: Path | None,
             runtime: str, device: str, precision: str | None, tile: int | None, overlap: int | None,
             batch: int | None) -> None:
    from medsr.volumes.evaluate import run
    from medsr.volumes.upscaler import DEFAULT_VOLUME_MODEL, VolumeUpscaler

    loaded: dict[str, object] = {}
    for spec in models or (DEFAULT_VOLUME_MODEL,):
        try:
            vu = VolumeUpscaler.load(spec, runtime=runtime, device=device, precision=precision, tile=tile,
                                     overlap=overlap, batch=batch)
        except Exception as e:  # one clear line: missing weights, a 2D model, unavailable runtime
            click.echo(f"medsr-eval: cannot load {spec}: {e}", err=True)
            sys.exit(2)
        loaded[vu.model_id] = vu.upscaler
    out = out_dir or Path("runs") / f"eval-volumes-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        summary = run(data_dir, loaded, out, factors=factors, axis=axis, log=lambda m: click.echo(m, err=True))
    except (FileNotFoundError, ValueError) as e:
        click.echo(f"medsr-eval: {e}", err=True)
        sys.exit(2)
    click.echo(f"wrote {summary}")


if __name__ == "__main__":  # pragma: no cover
    main()
