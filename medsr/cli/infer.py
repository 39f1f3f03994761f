"""medsr-infer: upscale files and folders (PNG/JPEG/TIFF/DICOM, 8/16-bit), keeping format and depth."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

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
@click.option("--factor", type=click.FloatRange(min=1.0), default=None,
              help="Volumes: through-plane factor [default: slice spacing / in-plane spacing, i.e. isotropic].")
@click.option("--spacing", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Volumes: target slice spacing in mm (instead of --factor).")
@click.option("--axis", type=click.IntRange(0, 2), default=None,
              help="Volumes: the low-resolution voxel axis [default: the one with the largest spacing].")
@click.option("--encoders", type=click.IntRange(min=0), default=0, show_default=True,
              help="Overlap reading, upscaling and writing: N encoder processes build and write outputs (JPEG 2000, "
                   "PNG) while the engine upscales the next image (medsr.pipeline); 0: one file after another.")
@logging_options
def main(inputs: tuple[Path, ...], output: Path, engine: str | None, model: str | None, triton_url: str | None,
         tile: int | None, overlap: int | None, batch: int | None, runtime: str, device: str, precision: str | None,
         compile_: bool, overwrite: bool, max_pixels: int | None, dicom_syntax: str | None, ray_address: str | None,
         workers: int | None, factor: float | None, spacing: float | None, axis: int | None, encoders: int,
         log: LogOptions) -> None:
    """Upscale INPUTS (files or folders, recursive) into the -o folder, keeping format and bit depth.

    A file that cannot be read is reported and skipped, and the exit code is 1. Non-image files met
    while walking a folder (e.g. a manifest.csv) are listed as ignored and do not fail the run.
    """
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

    try:  # the one TileConfig of the run, checked before the model loads
        # Triton: fixed-shape tiles, so the server's dynamic batcher can merge requests across images and clients
        config = TileConfig.from_options(tile, overlap, batch, fit=not triton_url)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    vwalk = _volume_jobs(list(inputs), outdir)
    vres: tuple[int, int, list[tuple[Path, str]]] = (0, 0, [])
    walk = collect_jobs(list(inputs), outdir, exclude=vwalk.exclude if vwalk else frozenset())
    if vwalk and vwalk.jobs:
        if triton_url:
            raise click.UsageError("volumes run locally or with --ray: --triton applies to 2D images (docs/scale.md)")
        if factor is not None and spacing is not None:
            raise click.UsageError("give --factor or --spacing, not both")
        t0 = time.perf_counter()
        if ray_address is not None:  # one volume per actor call (medsr.scale.ray_volumes)
            vres = _run_volumes_ray(vwalk.jobs, engine or model, runtime, precision, device, config, overwrite,
                                    factor, spacing, axis, dicom_syntax, quiet, ray_address, workers, outdir)
        else:
            vres = _run_volumes(vwalk.jobs, engine or model, runtime, precision, device, config, overwrite, factor,
                                spacing, axis, dicom_syntax, quiet)
        if not walk.jobs and not walk.failed:
            summary = Summary(written=vres[0], skipped=vres[1], failed=vres[2])
            _finish(summary, walk.ignored, time.perf_counter() - t0, outdir, None, unit="volumes")
        walk.failed.extend(vres[2])
    jobs, ignored = walk.jobs, walk.ignored
    input_files = {j.src.resolve() for j in jobs}
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if workers is not None and ray_address is None:
        raise click.UsageError("--workers applies to --ray")
    if ray_address is not None and triton_url:
        raise click.UsageError("give --ray (workers load the model) or --triton (a server runs it), not both")
    if ray_address is not None and compile_:
        raise click.UsageError("--compile is not available with --ray")
    # outputs over inputs refused, stale temps removed, SIGTERM handled: before anything else runs
    summary, todo = _start_run(walk, input_files)
    summary.written, summary.skipped = vres[0], vres[1]  # volumes of a mixed run
    # which model runs on which input: the one named, else chosen per input (medsr.runtime.choice), logged
    groups: dict[str | None, list[Job]] = {}
    if engine or model or triton_url:
        groups[engine or model] = todo
    else:
        for j, choice in _choose_models(todo):
            click.echo(f"medsr-infer model {choice.model} for {j.src} ({choice.reason})", err=True)
            groups.setdefault(choice.model, []).append(j)
        if ray_address is not None and len(groups) > 1:
            raise click.UsageError(
                f"these inputs need different models ({', '.join(sorted(str(g) for g in groups))}; see docs/weights.md, "
                "model choice): give --model, or run them separately")
    t0 = time.perf_counter()
    interrupted: str | None = None
    ran: list[str] = []
    for spec, gjobs in groups.items() or {None: []}.items():
        try:  # before anything loads (on Ray: on the driver, not as dying actors): a wrong name fails here
            job = _job_identity(spec, triton_url, runtime, device, precision, compile_)
        except Exception as e:
            if len(groups) == 1:
                click.echo(f"medsr-infer: cannot load the model: {e}", err=True)
                sys.exit(2)
            summary.failed += [(j.src, f"{j.src}: cannot load the model {spec} chosen for it: {e}") for j in gjobs]
            continue
        # existing outputs: skipped when this job made them, refused otherwise; from file headers, no model loaded
        existing = sort_existing(gjobs, job, overwrite=overwrite, inputs=input_files)
        summary.skipped += len(existing.skip)
        summary.failed += existing.refuse
        gwalk = Walk(jobs=existing.run, ignored=ignored)
        if not gwalk.jobs:  # nothing left to upscale: no model to load
            continue
        if ray_address is not None:
            from medsr.scale.ray_batch import LoadSpec, RayOptions

            load = LoadSpec(spec, runtime, device, precision, config, dicom_syntax)
            gwalk.failed = summary.failed
            _run_ray(gwalk, input_files, load, RayOptions(None if ray_address == "local" else ray_address, workers),
                     overwrite, limit, quiet, outdir, verbose=log.verbose > 0, skipped=summary.skipped,
                     written=summary.written)
        try:
            if triton_url:
                from medsr.api import Upscaler

                up = Upscaler.from_triton(triton_url, model, precision=precision, config=config)  # type: ignore[arg-type]
            else:
                up = _load_upscaler(engine, None if engine else spec, runtime, precision, device, compile_,
                                    config=config)
        except Exception as e:  # one clear line, no traceback: missing weights, bad engine, no GPU
            if len(groups) == 1:
                click.echo(f"medsr-infer: cannot load the model: {e}", err=True)
                sys.exit(2)
            summary.failed += [(j.src, f"{j.src}: cannot load the model {spec} chosen for it: {e}") for j in gwalk.jobs]
            continue
        try:  # tile/overlap against the model's size multiple and the engine's profile
            plan_tiles(config.tile, config.tile, config, up.backend.tile_limits())
        except ValueError as e:
            raise click.UsageError(f"{e} (model {up.model_id}, x{up.scale})") from None
        ran.append(up.describe())
        click.echo(f"medsr-infer running {ran[-1]}", err=True)  # not "medsr-infer: ": that prefix is the summary line
        interrupted = _run_local(up, gwalk.jobs, summary, overwrite, limit, dicom_syntax, quiet, encoders)
        summary.megapixels += up.lr_pixels / 1e6
        if interrupted:
            break
    _finish(summary, ignored, time.perf_counter() - t0, outdir, interrupted, "; ".join(ran))


def _run_local(up: object, jobs: list[Job], summary: Summary, overwrite: bool, limit: int, dicom_syntax: str | None,
               quiet: bool, encoders: int = 0) -> str | None:
    """Upscale ``jobs`` with ``up`` in this process (``encoders`` > 0: the overlapped pipeline), counting into
    ``summary``; the interruption message if the run was interrupted (SIGINT/SIGTERM), else None."""
    from tqdm import tqdm

    files_bar = tqdm(jobs, desc="files", unit="file", disable=quiet, position=0)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=quiet, position=1, leave=False)
    interrupted: str | None = None
    if encoders:  # the overlapped pipeline: same rules, same summary
        interrupted = _run_pipeline(up, jobs, summary, files_bar, tiles_bar, overwrite, limit, dicom_syntax, encoders)
        jobs = []
    for job in files_bar if not encoders else ():
        try:
            up.upscale_file(job.src, job.dst, overwrite=overwrite, max_pixels=limit,  # type: ignore[attr-defined]
                            progress=_bar_progress(tiles_bar), dicom_syntax=dicom_syntax)
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
    tiles_bar.close()
    files_bar.close()
    return interrupted


def _run_pipeline(up: object, jobs: list[Job], summary: Summary, files_bar: object, tiles_bar: object,
                  overwrite: bool, max_pixels: int, dicom_syntax: str | None, encoders: int) -> str | None:
    """medsr-infer --encoders N: medsr.pipeline.run_pipeline, outcomes counted into ``summary``; the
    interruption message when stopped."""
    from medsr.pipeline import FAILED, SKIPPED, PipelineOptions, run_pipeline

    run = run_pipeline(up, [(j.src, j.dst) for j in jobs], overwrite=overwrite, max_pixels=max_pixels,  # type: ignore[arg-type]
                       dicom_syntax=dicom_syntax, options=PipelineOptions(encoders=encoders),
                       progress=_bar_progress(tiles_bar))
    try:
        for o in run:
            files_bar.update(1)  # type: ignore[attr-defined]
            if o.status == SKIPPED:
                summary.skipped += 1
            elif o.status == FAILED:
                summary.failed.append((o.src, o.message))  # reported once, with the summary
            else:
                summary.written += 1
    except KeyboardInterrupt as e:
        run.close()
        return f"interrupted ({e or 'SIGINT'}); files being written were abandoned (no partial outputs)"
    return None


def _choose_models(jobs: list[Job]) -> list[tuple[Job, Any]]:
    """(job, ModelChoice) by the one rule (``medsr.runtime.choice.choose_model``), for runs without --model."""
    from medsr.runtime.choice import choose_model

    return [(j, choose_model(j.src)) for j in jobs]


def _volume_jobs(inputs: list[Path], outdir: Path):  # type: ignore[no-untyped-def]
    """The volumes among the inputs (NIfTI/MGZ, CT/MR series folders), or None without medsr[volumes]."""
    try:
        from medsr.volumes.batch import split_inputs
    except ImportError:  # nibabel/scipy not installed: 2D only
        return None
    return split_inputs(inputs, outdir)


def _run_volumes(jobs: list, spec: str | None, runtime: str, precision: str | None, device: str, config: object,  # type: ignore[type-arg]
                 overwrite: bool, factor: float | None, spacing: float | None, axis: int | None,
                 dicom_syntax: str | None, quiet: bool) -> tuple[int, int, list[tuple[Path, str]]]:
    """The volume jobs (medsr.volumes.batch), with the through-plane model (default medsr-mr-tp)."""
    from tqdm import tqdm

    from medsr.volumes.batch import run_volume_jobs

    def load():  # type: ignore[no-untyped-def]
        from medsr.api import Upscaler
        from medsr.volumes import VolumeUpscaler
        from medsr.volumes.upscaler import DEFAULT_VOLUME_MODEL

        try:
            vu = VolumeUpscaler(Upscaler.load(spec or DEFAULT_VOLUME_MODEL, runtime=runtime, device=device,
                                              precision=precision, config=config))  # type: ignore[arg-type]
        except Exception as e:  # one clear line: missing weights, a 2D model, no runtime
            click.echo(f"medsr-infer: cannot load the volume model: {e}", err=True)
            sys.exit(2)
        click.echo(f"medsr-infer volumes run {vu.upscaler.describe()}", err=True)  # type: ignore[union-attr]
        return vu

    def progress(name: str):  # type: ignore[no-untyped-def]
        if quiet:
            return None
        bar = tqdm(desc=Path(name).name, unit="slice", leave=False)
        return _bar_progress(bar)

    for j in jobs:
        click.echo(f"medsr-infer detected {j.description} in {j.src}: one volume", err=True)
    return run_volume_jobs(jobs, load, overwrite=overwrite, factor=factor, spacing=spacing, axis=axis,
                           dicom_syntax=dicom_syntax, log=lambda m: click.echo(m, err=True), progress=progress)


def _run_volumes_ray(jobs: list, spec: str | None, runtime: str, precision: str | None, device: str,  # type: ignore[type-arg]
                     config: object, overwrite: bool, factor: float | None, spacing: float | None, axis: int | None,
                     dicom_syntax: str | None, quiet: bool, ray_address: str, workers: int | None,
                     outdir: Path) -> tuple[int, int, list[tuple[Path, str]]]:
    """The volume jobs on Ray (medsr.scale.ray_volumes): one volume per actor call, written by the actor;
    same rules, counts and messages as :func:`_run_volumes`."""
    from tqdm import tqdm

    from medsr.scale import ray_volumes
    from medsr.scale.ray_batch import LoadSpec, RayOptions
    from medsr.volumes.upscaler import DEFAULT_VOLUME_MODEL
    from medsr.weights import WeightsError, check_spec

    try:  # on the driver: a wrong name fails here, not as dying actors (as locally: only if a volume needs it)
        if any(overwrite or not j.dst.exists() for j in jobs):
            check_spec(spec or DEFAULT_VOLUME_MODEL)
    except WeightsError as e:
        click.echo(f"medsr-infer: cannot load the volume model: {e}", err=True)
        sys.exit(2)
    for j in jobs:
        click.echo(f"medsr-infer detected {j.description} in {j.src}: one volume", err=True)
    load = LoadSpec(spec, runtime, device, precision, config, dicom_syntax)
    options = RayOptions(None if ray_address == "local" else ray_address, workers)
    summary = Summary()
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="volumes (ray)", unit="volume", disable=quiet)
    try:
        for r in ray_volumes.run(jobs, load, options, overwrite=overwrite, factor=factor, spacing=spacing, axis=axis,
                                 quiet=quiet, log=lambda m: click.echo(f"medsr-infer: {m}", err=True)):
            bar.update(1)
            for line in r["log"]:
                tqdm.write(line, file=sys.stderr)
            if r["status"] == ray_volumes.WRITTEN:
                summary.written += 1
            elif r["status"] == ray_volumes.SKIPPED:
                summary.skipped += 1
            else:
                summary.failed.append((r["src"], r["message"]))
    except KeyboardInterrupt as e:
        bar.close()
        _finish(summary, [], time.perf_counter() - t0, outdir,
                f"interrupted ({e or 'SIGINT'}); volumes being written were abandoned (no partial outputs)",
                unit="volumes")
    except ray_volumes.LoadFailed as e:  # one clear line: missing weights, a 2D model, no runtime
        bar.close()
        click.echo(f"medsr-infer: cannot load the volume model: {_short(e)}", err=True)
        sys.exit(2)
    except Exception as e:  # Ray itself failed (no cluster, a pool that does not fit)
        bar.close()
        click.echo(f"medsr-infer: the Ray run failed: {_short(e)}", err=True)
        sys.exit(2)
    bar.close()
    return summary.written, summary.skipped, summary.failed


def _start_run(walk: Walk, input_files: set[Path], skipped: int = 0) -> tuple[Summary, list[Job]]:
    """What every run does before the first file (local or Ray): :func:`medsr.batch.start_run` (outputs that would
    overwrite an input fail, temps of runs killed mid-write are removed), and SIGTERM (a service stop, `kill`)
    ends the run like Ctrl-C (the file being written is abandoned cleanly, the exit status is non-zero)."""
    summary, jobs, stale = start_run(walk, input_files, skipped)
    for path in stale:
        click.echo(f"  removed stale temporary file of an interrupted run: {path}", err=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return summary, jobs


def _finish(summary: Summary, ignored: list[tuple[Path, str]], dt: float, outdir: Path, interrupted: str | None,
            ran: str = "", unit: str = "") -> None:
    """The run's summary and exit status (0; 1 if any file failed; 130 when interrupted); ``ran``: what ran
    (``Upscaler.describe()``), named in the summary line."""
    for line in summary_lines(summary, ignored, dt, outdir, ran=ran, unit=unit):  # all on stderr: one line per failure
        click.echo(line, err=True)
    if interrupted:
        click.echo(f"medsr-infer: {interrupted}; re-run to continue (existing outputs are skipped)", err=True)
        sys.exit(130)
    sys.exit(1 if summary.failed else 0)


def _run_ray(walk: Walk, input_files: set[Path], load: object, options: object, overwrite: bool,
             max_pixels: int, quiet: bool, outdir: Path, verbose: bool = False, skipped: int = 0,
             written: int = 0) -> None:
    """The same job on Ray Data (medsr.scale.ray_batch); same guarantees, summary and exit status."""
    from tqdm import tqdm

    from medsr.scale import ray_batch

    summary, jobs = _start_run(walk, input_files, skipped)
    summary.written = written  # volumes of a mixed run
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
