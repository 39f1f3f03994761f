"""medsr-infer: upscale files and folders (PNG/JPEG/TIFF/DICOM, 8/16-bit), keeping format and depth."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from medsr.batch import Job, Summary, Walk, collect_jobs, sort_existing, start_run, summary_lines
from medsr.cli.options import (
    LogOptions,
    logging_options,
    model_options,
    output_option,
    runtime_options,
    tiling_options,
)
from medsr.weights.registry import DEFAULT_MODEL


def _load_upscaler(engine: str | None, model: str | None, runtime: str, precision: str | None, device: str,
                   compile: bool = False, config: object = None):
    from medsr.api import Upscaler

    return Upscaler.load(engine or model, runtime=runtime, device=device, precision=precision, compile=compile,
                         config=config)  # type: ignore[arg-type]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@output_option(required=True, help="Output folder; input folder structure is mirrored inside it.")
@model_options(model_help=f"Registered model name or weights path [default: {DEFAULT_MODEL}, the shipped chest X-ray "
               "fidelity model; realesrgan-x4plus is the general GAN model]; with --triton, the name of the model on "
               "the server.")
@click.option("--triton", "triton_url", metavar="URL",
              help="Run on a Triton Inference Server (grpc://HOST:8001, http://HOST:8000): tiles go to the server "
                   "in batches; needs --model NAME. See docs/scale.md.")
@tiling_options()
@runtime_options()
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (PyTorch only; slow first tile).")
@click.option("--overwrite", is_flag=True,
              help="Replace existing outputs (default: skip an output whose provenance matches this job; refuse one "
                   "made otherwise).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Refuse inputs with more LR pixels than this, read from the header before decoding "
                   "[default: 50000000].")
@click.option("--dicom-syntax", default=None, callback=lambda ctx, param, v: _check_syntax(v),
              help="DICOM output transfer syntax: jpeg2000-lossless (default; RLE for images under 32 px), rle, "
                   "explicit-le (uncompressed) or jpeg2000-lossy[:RATIO] (lossy, marked as such; default ratio 10).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray Data (pip install 'medsr[scale]'): alone, a local Ray on this machine; 'auto' joins "
                   "this machine's cluster; ray://HEAD:10001 a remote one. Paths must be shared by all workers.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --ray: upscale actors (default: one per GPU, or one per 2 CPUs).")
@logging_options
def main(inputs: tuple[Path, ...], output: Path, engine: str | None, model: str | None, triton_url: str | None,
         tile: int | None, overlap: int | None, batch: int | None, runtime: str, device: str, precision: str | None,
         compile_: bool, overwrite: bool, max_pixels: int | None, dicom_syntax: str | None, ray_address: str | None,
         workers: int | None, log: LogOptions) -> None:
    """Upscale INPUTS (files or folders, recursive) into the -o folder, keeping format and bit depth.

    A file that cannot be read is reported and skipped, and the exit code is 1. Non-image files met
    while walking a folder (e.g. a manifest.csv) are listed as ignored and do not fail the run.
    """
    from tqdm import tqdm

    outdir, quiet = output, not log.progress
    if engine and model:
        raise click.UsageError("give --engine or --model, not both")
    if triton_url:
        _check_triton_args(model, engine, runtime, device, compile_)
    from medsr.runtime.contract import engine_kind

    if compile_ and ((engine and engine_kind(engine) != "weights") or runtime not in ("auto", "torch")):
        raise click.UsageError("--compile applies to PyTorch models, not to ONNX, OpenVINO or TensorRT engines")
    from medsr.io import DEFAULT_MAX_PIXELS
    from medsr.runtime import TileConfig, plan_tiles
    from medsr.runtime.contract import default_overlap

    d = TileConfig()
    try:  # the one TileConfig of the run, checked before the model loads
        t = d.tile if tile is None else tile
        # Triton: fixed-shape tiles, so the server's dynamic batcher can merge requests across images and clients
        config = TileConfig(tile=t, overlap=default_overlap(t) if overlap is None else overlap, batch=batch,
                            fit=not triton_url)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    walk = collect_jobs(list(inputs), outdir)
    jobs, ignored = walk.jobs, walk.ignored
    input_files = {j.src.resolve() for j in jobs}
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if workers is not None and ray_address is None:
        raise click.UsageError("--workers applies to --ray")
    if ray_address is not None and triton_url:
        raise click.UsageError("give --ray (workers load the model) or --triton (a server runs it), not both")
    if ray_address is not None and compile_:
        raise click.UsageError("--compile is not available with --ray")
    try:  # before anything loads (on Ray: on the driver, not as dying actors): a wrong name fails here
        job = _job_identity(engine or model, triton_url, runtime, device, precision, compile_)
    except Exception as e:
        click.echo(f"medsr-infer: cannot load the model: {e}", err=True)
        sys.exit(2)
    # existing outputs: skipped when this job made them, refused otherwise; from file headers, no model loaded
    existing = sort_existing(walk.jobs, job, overwrite=overwrite, inputs=input_files)
    walk.jobs, walk.failed = existing.run, walk.failed + existing.refuse
    if not walk.jobs:  # nothing left to upscale: no model to load
        summary, _ = _start_run(walk, input_files, len(existing.skip))
        _finish(summary, ignored, 0.0, outdir, None)
    if ray_address is not None:
        from medsr.scale.ray_batch import LoadSpec, RayOptions

        load = LoadSpec(engine or model, runtime, device, precision, config, dicom_syntax)
        _run_ray(walk, input_files, load, RayOptions(None if ray_address == "local" else ray_address, workers),
                 overwrite, limit, quiet, outdir, verbose=log.verbose > 0, skipped=len(existing.skip))
    try:
        if triton_url:
            from medsr.api import Upscaler

            up = Upscaler.from_triton(triton_url, model, precision=precision, config=config)  # type: ignore[arg-type]
        else:
            up = _load_upscaler(engine, model, runtime, precision, device, compile_, config=config)
    except Exception as e:  # one clear line, no traceback: missing weights, bad engine, no GPU
        click.echo(f"medsr-infer: cannot load the model: {e}", err=True)
        sys.exit(2)
    try:  # tile/overlap against the model's size multiple and the engine's profile
        plan_tiles(config.tile, config.tile, config, up.backend.tile_limits())
    except ValueError as e:
        raise click.UsageError(f"{e} (model {up.model_id}, x{up.scale})") from None

    summary, jobs = _start_run(walk, input_files, len(existing.skip))
    t0 = time.perf_counter()
    interrupted: str | None = None
    files_bar = tqdm(jobs, desc="files", unit="file", disable=quiet, position=0)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=quiet, position=1, leave=False)
    for job in files_bar:
        try:
            up.upscale_file(job.src, job.dst, overwrite=overwrite, max_pixels=limit, progress=_bar_progress(tiles_bar),
                            dicom_syntax=dicom_syntax)
        except FileExistsError:
            summary.skipped += 1
            continue
        except KeyboardInterrupt as e:
            interrupted = f"interrupted ({e or 'SIGINT'}) while writing {job.dst}: that file was not written"
            break
        except Exception as e:
            msg = str(e) or type(e).__name__
            if job.src.name not in msg:
                msg = f"{job.src}: {msg}"
            summary.failed.append((job.src, msg))  # reported once, with the summary
            continue
        summary.written += 1
    summary.megapixels = up.lr_pixels / 1e6
    tiles_bar.close()
    files_bar.close()
    _finish(summary, ignored, time.perf_counter() - t0, outdir, interrupted)


def _start_run(walk: Walk, input_files: set[Path], skipped: int = 0) -> tuple[Summary, list[Job]]:
    """What every run does before the first file (local or Ray): :func:`medsr.batch.start_run` (outputs that would
    overwrite an input fail, temps of runs killed mid-write are removed), and SIGTERM (a service stop, `kill`)
    ends the run like Ctrl-C (the file being written is abandoned cleanly, the exit status is non-zero)."""
    summary, jobs, stale = start_run(walk, input_files, skipped)
    for path in stale:
        click.echo(f"  removed stale temporary file of an interrupted run: {path}", err=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return summary, jobs


def _finish(summary: Summary, ignored: list[tuple[Path, str]], dt: float, outdir: Path, interrupted: str | None) -> None:
    """The run's summary and exit status (0; 1 if any file failed; 130 when interrupted)."""
    for line in summary_lines(summary, ignored, dt, outdir):  # all on stderr: one line per failure
        click.echo(line, err=True)
    if interrupted:
        click.echo(f"medsr-infer: {interrupted}; re-run to continue (existing outputs are skipped)", err=True)
        sys.exit(130)
    sys.exit(1 if summary.failed else 0)


def _run_ray(walk: Walk, input_files: set[Path], load: object, options: object, overwrite: bool,
             max_pixels: int, quiet: bool, outdir: Path, verbose: bool = False, skipped: int = 0) -> None:
    """The same job on Ray Data (medsr.scale.ray_batch); same guarantees, summary and exit status."""
    from tqdm import tqdm

    from medsr.scale import ray_batch

    summary, jobs = _start_run(walk, input_files, skipped)
    t0 = time.perf_counter()
    interrupted: str | None = None
    bar = tqdm(total=len(jobs), desc="files (ray)", unit="file", disable=quiet)
    try:
        for r in ray_batch.run([(j.src, j.dst) for j in jobs], load, options, overwrite=overwrite, max_pixels=max_pixels,  # type: ignore[arg-type]
                               quiet=not verbose):  # Ray's own logs and bars: only with -v
            bar.update(1)
            if r["status"] == ray_batch.WRITTEN:
                summary.written += 1
                summary.megapixels += r["lr_pixels"] / 1e6
            elif r["status"] == ray_batch.SKIPPED:
                summary.skipped += 1
            else:
                summary.failed.append((Path(r["src"]), r["message"]))
    except KeyboardInterrupt as e:
        interrupted = f"interrupted ({e or 'SIGINT'}); files being written were abandoned (no partial outputs)"
    except Exception as e:  # Ray itself failed (no cluster, a worker could not load the model): one clear line
        bar.close()
        click.echo(f"medsr-infer: the Ray run failed: {_short(e)}", err=True)
        sys.exit(2)
    bar.close()
    _finish(summary, walk.ignored, time.perf_counter() - t0, outdir, interrupted)


def _job_identity(spec: str | None, triton_url: str | None, runtime: str, device: str, precision: str | None,
                  compile_: bool) -> dict[str, str | None]:
    """What this job will write as provenance, without loading the model (medsr.api.job_provenance)."""
    if triton_url:  # the server's model: its file is not here
        return {"source-sha256": None, "runtime": "triton", "precision": precision}
    from medsr.api import job_provenance

    return job_provenance(spec, runtime=runtime, device=device, precision=precision, compile=compile_)


def _short(e: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a (Ray-wrapped) exception, else its type."""
    import re

    lines = [ln.strip() for ln in str(e).splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): ", ln)]
    return (lines[-1] if lines else f"{type(e).__name__}: {str(e).strip()[:300]}")[:500]


def _check_triton_args(model: str | None, engine: str | None, runtime: str, device: str, compile_: bool) -> None:
    """--triton runs the server's model: local engine, runtime, device and compile options do not apply."""
    if not model:
        raise click.UsageError("--triton needs --model NAME (the model's name on the Triton server)")
    if engine:
        raise click.UsageError("give --engine (a local engine) or --triton (a server), not both")
    if runtime != "auto" or device != "auto" or compile_:
        raise click.UsageError("--runtime, --device and --compile apply to local engines; with --triton the "
                               "server's model configuration decides (instance_group, platform)")


def _bar_progress(bar):  # type: ignore[no-untyped-def]
    def progress(done: int, total: int) -> None:
        if done == 0:
            bar.reset(total=total)
        else:
            bar.n = done
            bar.refresh()

    return progress


def _check_syntax(value: str | None) -> str | None:
    from medsr.io.dicom_derive import parse_syntax

    try:
        parse_syntax(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--dicom-syntax") from None
    return value


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    main()
