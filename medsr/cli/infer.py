"""medsr-infer: upscale files and folders (PNG/JPEG/TIFF/DICOM, 8/16-bit), keeping format and depth."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click


@dataclass
class Job:
    src: Path
    dst: Path


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    megapixels: float = 0.0


def _looks_like_image(path: Path) -> bool:
    """A supported suffix (or none), or DICOM by content (UID-named files like 1.2.840.113619.4)."""
    from medsr.io import is_supported

    if is_supported(path):
        return True
    try:
        with path.open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return True  # let the reader report the problem


def collect_jobs(inputs: list[Path], outdir: Path) -> tuple[list[Job], list[Path]]:
    """Files as given; folders walked recursively (hidden files skipped), structure mirrored.

    Returns (jobs, ignored): files met while walking a folder that are not images (a manifest.csv
    beside the scans) are ignored and reported, not failed. Files named explicitly are always tried.
    """
    jobs: list[Job] = []
    ignored: list[Path] = []
    for inp in inputs:
        if inp.is_dir():
            for f in sorted(inp.rglob("*")):
                rel = f.relative_to(inp)
                if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if not _looks_like_image(f):
                    ignored.append(f)
                    continue
                jobs.append(Job(f, outdir / inp.name / rel if len(inputs) > 1 else outdir / rel))
        else:
            jobs.append(Job(inp, outdir / inp.name))
    return jobs, ignored


def _load_upscaler(engine: str | None, model: str | None, **kw: object):
    from medsr.api import Upscaler

    if engine:
        return Upscaler.from_engine(engine, **kw)  # type: ignore[arg-type]
    return Upscaler.from_pretrained(model, **kw)  # type: ignore[arg-type]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder; input folder structure is mirrored inside it.")
@click.option("--engine", type=click.Path(exists=True, dir_okay=False),
              help="Engine or model file: .plan (TensorRT), .onnx (ONNX Runtime), .pth/.safetensors (PyTorch).")
@click.option("--model", help="Registered model name or weights path (default: medsr-cxr-x4, the shipped "
              "chest X-ray fidelity model; realesrgan-x4plus is the general GAN model).")
@click.option("--tile", type=int, default=None, help="LR tile edge in pixels, overlap included.")
@click.option("--overlap", type=int, default=None, help="LR pixels shared by neighbouring tiles.")
@click.option("--batch", type=int, default=None, help="Tiles per backend call.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (PyTorch only; slow first tile).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (default: skip them).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def main(inputs: tuple[Path, ...], outdir: Path, engine: str | None, model: str | None, tile: int | None,
         overlap: int | None, batch: int | None, device: str, precision: str, compile_: bool, overwrite: bool,
         quiet: bool) -> None:
    """Upscale INPUTS (files or folders, recursive) into OUTDIR.

    A file that cannot be read is reported and skipped, and the exit code is 1. Non-image files met
    while walking a folder (e.g. a manifest.csv) are listed as ignored and do not fail the run.
    """
    from tqdm import tqdm

    if engine and model:
        raise click.UsageError("give --engine or --model, not both")
    if compile_ and engine and Path(engine).suffix.lower() in {".onnx", ".plan", ".engine"}:
        raise click.UsageError("--compile applies to PyTorch models, not to ONNX or TensorRT engines")
    jobs, ignored = collect_jobs(list(inputs), outdir)
    input_files = {j.src.resolve() for j in jobs}
    from medsr.runtime import TileConfig, plan_tiles

    defaults = TileConfig()
    try:
        TileConfig(tile=tile or defaults.tile, overlap=defaults.overlap if overlap is None else overlap, batch=batch or 1)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        kw: dict[str, object] = {"compile": True} if compile_ else {}
        up = _load_upscaler(engine, model, device=device, precision=precision, tile=tile, overlap=overlap, batch=batch, **kw)
    except Exception as e:  # one clear line, no traceback: missing weights, bad engine, no GPU
        click.echo(f"medsr-infer: cannot load the model: {e}", err=True)
        sys.exit(2)
    try:  # tile/overlap against the model's size multiple and the engine's profile
        plan_tiles(up.config.tile, up.config.tile, up.config, up.backend.tile_limits())
    except ValueError as e:
        raise click.UsageError(f"{e} (model {up.model_id}, x{up.scale})") from None

    summary = Summary()
    t0 = time.perf_counter()
    files_bar = tqdm(jobs, desc="files", unit="file", disable=quiet, position=0)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=quiet, position=1, leave=False)
    for job in files_bar:
        if job.dst.resolve() in input_files:
            summary.failed.append((job.src, f"output {job.dst} would overwrite an input; choose another -o"))
            continue
        if job.dst.exists() and not overwrite:
            summary.skipped += 1
            continue
        try:
            from medsr.io import read_image, write_image

            img = read_image(job.src)
            tiles_bar.reset(total=up.plan(img.height, img.width, img.channels).num_tiles)
            job.dst.parent.mkdir(parents=True, exist_ok=True)
            write_image(up.upscale_image(img, on_tiles=tiles_bar.update), job.dst)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            msg = str(e) or type(e).__name__
            if job.src.name not in msg:
                msg = f"{job.src}: {msg}"
            summary.failed.append((job.src, msg))
            tqdm.write(f"FAILED {msg}", file=sys.stderr)
            continue
        summary.written += 1
        summary.megapixels += img.height * img.width / 1e6
    tiles_bar.close()
    files_bar.close()
    dt = time.perf_counter() - t0
    for path in ignored:
        click.echo(f"  ignored (not an image): {path}", err=True)
    click.echo(
        f"medsr-infer: {summary.written} written, {summary.skipped} skipped (exist), {len(summary.failed)} failed, "
        f"{len(ignored)} ignored (not images); "
        f"{summary.megapixels:.2f} LR megapixels in {dt:.1f} s -> {outdir}"
    )
    for _src, msg in summary.failed:
        click.echo(f"  failed: {msg}", err=True)
    sys.exit(1 if summary.failed else 0)


if __name__ == "__main__":
    main()
