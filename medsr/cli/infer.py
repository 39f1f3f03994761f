"""medsr-infer: upscale files and folders (PNG/JPEG/TIFF/DICOM, 8/16-bit), keeping format and depth."""

from __future__ import annotations

import os
import signal
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


@dataclass
class Walk:
    jobs: list[Job] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (path, why): not images, special files
    failed: list[tuple[Path, str]] = field(default_factory=list)  # dangling links, output collisions


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def collect_jobs(inputs: list[Path], outdir: Path) -> Walk:
    """Files as given; folders walked recursively (hidden files skipped), structure mirrored.

    - Symbolic links are followed (files and folders); a folder reached twice (a link loop or two
      links to one folder) is walked once; a dangling link is reported as failed.
    - The output folder is never walked, even when it lies inside an input folder.
    - Files met while walking that are not images (a manifest.csv) or not regular files (a FIFO)
      are ignored and reported; files named explicitly are always tried.
    - Two inputs that map to one output (``d1/a.png d2/a.png``, ``a.png`` + ``a.PNG`` on a
      case-insensitive disk) are both reported as failed before anything runs: nothing is dropped.
    """
    w = Walk()
    multi = len(inputs) > 1
    for inp in inputs:
        if not inp.is_dir():
            w.jobs.append(Job(inp, outdir / inp.name))
            continue
        if _inside(inp, outdir):
            w.ignored.append((inp, "is inside the output folder"))
            continue
        seen: set[tuple[int, int]] = set()
        for root, dirs, files in os.walk(inp, followlinks=True):
            rootp = Path(root)
            st = rootp.stat()
            if (st.st_dev, st.st_ino) in seen:
                w.ignored.append((rootp, "folder already walked (symbolic link loop or duplicate link)"))
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _same_or_inside(rootp / d, outdir))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                f = rootp / name
                rel = f.relative_to(inp)
                if f.is_symlink() and not f.exists():
                    w.failed.append((f, f"{f}: dangling symbolic link (target {os.readlink(f)} does not exist)"))
                    continue
                if not f.is_file():
                    w.ignored.append((f, "not a regular file"))
                    continue
                if not _looks_like_image(f):
                    w.ignored.append((f, "not an image"))
                    continue
                w.jobs.append(Job(f, outdir / inp.name / rel if multi else outdir / rel))
            for d in list(dirs):  # dangling links to folders show up in neither list as files
                if (rootp / d).is_symlink() and not (rootp / d).exists():
                    dirs.remove(d)
                    w.failed.append((rootp / d, f"{rootp / d}: dangling symbolic link"))
    _drop_collisions(w)
    return w


def _same_or_inside(path: Path, folder: Path) -> bool:
    return folder.exists() and _inside(path, folder)


def _drop_collisions(w: Walk) -> None:
    by_dst: dict[str, list[Job]] = {}
    for j in w.jobs:
        by_dst.setdefault(os.path.normcase(str(j.dst.absolute())).casefold(), []).append(j)
    clash = {id(j) for group in by_dst.values() if len(group) > 1 for j in group}
    for group in by_dst.values():
        if len(group) > 1:
            names = ", ".join(str(j.src) for j in group)
            for j in group:
                w.failed.append((j.src, f"{j.src}: output collision: {names} would all be written to {group[0].dst}; "
                                         "give them separate runs or output folders"))
    w.jobs = [j for j in w.jobs if id(j) not in clash]


def _load_upscaler(engine: str | None, model: str | None, runtime: str, precision: str | None, device: str,
                   compile: bool = False, config: object = None):
    from medsr.api import Upscaler

    return Upscaler.load(engine or model, runtime=runtime, device=device, precision=precision, compile=compile,
                         config=config)  # type: ignore[arg-type]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder; input folder structure is mirrored inside it.")
@click.option("--engine", type=click.Path(exists=True, dir_okay=False),
              help="Engine or model file: .plan (TensorRT), .onnx (ONNX Runtime), .pth/.safetensors (PyTorch).")
@click.option("--model", help="Registered model name or weights path (default: medsr-cxr-x4, the shipped "
              "chest X-ray fidelity model; realesrgan-x4plus is the general GAN model); with --triton, the name of "
              "the model on the server.")
@click.option("--triton", "triton_url", metavar="URL",
              help="Run on a Triton Inference Server (grpc://HOST:8001, http://HOST:8000): tiles go to the server "
                   "in batches; needs --model NAME. See docs/scale.md.")
@click.option("--tile", type=int, default=None, help="LR tile edge in pixels, overlap included.")
@click.option("--overlap", type=int, default=None, help="LR pixels shared by neighbouring tiles.")
@click.option("--batch", type=int, default=None, help="Tiles per backend call.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "fp16", "bf16"]), default=None,
              help="fp32 (IEEE, also on CUDA), tf32 (CUDA), fp16 (CUDA), bf16. Default: weights on a CPU run "
                   "OpenVINO bf16 where the CPU has native bf16 (else fp32; mean error vs fp32 0.25/255), weights on "
                   "CUDA fp32, .onnx/.plan the file's own; another one is honoured or refused, never ignored.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnxruntime", "openvino", "tensorrt"]), default="auto",
              show_default=True, help="Inference engine; auto: from the file type (weights: OpenVINO on a CPU when "
                                      "installed, else PyTorch).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (PyTorch only; slow first tile).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (default: skip them).")
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
@click.option("--encoders", type=click.IntRange(min=0), default=0, show_default=True,
              help="Overlap reading, upscaling and writing: N encoder processes build and write outputs (JPEG 2000, "
                   "PNG) while the engine upscales the next image (medsr.pipeline); 0: one file after another.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def main(inputs: tuple[Path, ...], outdir: Path, engine: str | None, model: str | None, triton_url: str | None,
         tile: int | None,
         overlap: int | None, batch: int | None, device: str, precision: str | None, runtime: str, compile_: bool,
         overwrite: bool, max_pixels: int | None, dicom_syntax: str | None, ray_address: str | None,
         workers: int | None, quiet: bool, encoders: int = 0) -> None:
    """Upscale INPUTS (files or folders, recursive) into OUTDIR.

    A file that cannot be read is reported and skipped, and the exit code is 1. Non-image files met
    while walking a folder (e.g. a manifest.csv) are listed as ignored and do not fail the run.
    """
    from tqdm import tqdm

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
    if ray_address is not None:
        if triton_url:
            raise click.UsageError("give --ray (workers load the model) or --triton (a server runs it), not both")
        if compile_:
            raise click.UsageError("--compile is not available with --ray")
        from medsr.scale.ray_batch import LoadSpec, RayOptions
        from medsr.weights import WeightsError, check_spec

        try:  # on the driver: a wrong name fails here, not as dying actors
            check_spec(engine or model)
        except WeightsError as e:
            click.echo(f"medsr-infer: cannot load the model: {e}", err=True)
            sys.exit(2)
        load = LoadSpec(engine or model, runtime, device, precision, config, dicom_syntax)
        _run_ray(walk, input_files, load, RayOptions(None if ray_address == "local" else ray_address, workers),
                 overwrite, limit, quiet, outdir)
    if not overwrite and walk.jobs and all(j.dst.exists() for j in walk.jobs):  # a skip-only pass: no model load
        summary, jobs = _start_run(walk, input_files)
        summary.skipped = len(jobs)
        _finish(summary, ignored, 0.0, outdir, None, "nothing: every output exists, the model was not loaded")
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

    ran = up.describe()
    click.echo(f"medsr-infer running {ran}", err=True)  # not "medsr-infer: ": that prefix is the summary line
    summary, jobs = _start_run(walk, input_files)
    t0 = time.perf_counter()
    interrupted: str | None = None
    files_bar = tqdm(jobs, desc="files", unit="file", disable=quiet, position=0)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=quiet, position=1, leave=False)
    if encoders:  # the overlapped pipeline: same rules, same summary
        interrupted = _run_pipeline(up, jobs, summary, files_bar, tiles_bar, overwrite, limit, dicom_syntax, encoders)
        jobs = []
    for job in files_bar if not encoders else ():
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
            summary.failed.append((job.src, msg))
            tqdm.write(f"FAILED {msg}", file=sys.stderr)
            continue
        summary.written += 1
    summary.megapixels = up.lr_pixels / 1e6
    tiles_bar.close()
    files_bar.close()
    _finish(summary, ignored, time.perf_counter() - t0, outdir, interrupted, ran)


def _run_pipeline(up: object, jobs: list[Job], summary: Summary, files_bar: object, tiles_bar: object,
                  overwrite: bool, max_pixels: int, dicom_syntax: str | None, encoders: int) -> str | None:
    """medsr-infer --encoders N: medsr.pipeline.run_pipeline, outcomes counted into ``summary``; the
    interruption message when stopped."""
    from tqdm import tqdm

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
                summary.failed.append((o.src, o.message))
                tqdm.write(f"FAILED {o.message}", file=sys.stderr)
            else:
                summary.written += 1
    except KeyboardInterrupt as e:
        run.close()
        return f"interrupted ({e or 'SIGINT'}); files being written were abandoned (no partial outputs)"
    return None


def _start_run(walk: Walk, input_files: set[Path]) -> tuple[Summary, list[Job]]:
    """What every run does before the first file (local or Ray): outputs that would overwrite an input
    fail, temps of runs killed mid-write are removed, and SIGTERM (a service stop, `kill`) ends the run
    like Ctrl-C (the file being written is abandoned cleanly, the exit status is non-zero)."""
    from medsr.fsutil import remove_stale_temps

    summary = Summary(failed=list(walk.failed))
    jobs = []
    for job in walk.jobs:
        if job.dst.resolve() in input_files:
            summary.failed.append((job.src, f"output {job.dst} would overwrite an input; choose another -o"))
        else:
            jobs.append(job)
    for folder in sorted({j.dst.parent for j in jobs}):
        for stale in remove_stale_temps(folder):
            click.echo(f"  removed stale temporary file of an interrupted run: {stale}", err=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return summary, jobs


def _finish(summary: Summary, ignored: list[tuple[Path, str]], dt: float, outdir: Path, interrupted: str | None,
            ran: str = "") -> None:
    """The run's summary and exit status (0; 1 if any file failed; 130 when interrupted); ``ran``: what ran
    (``Upscaler.describe()``), named in the summary line."""
    for path, why in ignored:
        click.echo(f"  ignored ({why}): {path}", err=True)
    click.echo(
        f"medsr-infer: {summary.written} written, {summary.skipped} skipped (exist), {len(summary.failed)} failed, "
        f"{len(ignored)} ignored (not images or not regular files); "
        f"{summary.megapixels:.2f} LR megapixels in {dt:.1f} s -> {outdir}" + (f"; ran {ran}" if ran else "")
    )
    for _src, msg in summary.failed:
        click.echo(f"  failed: {msg}", err=True)
    if interrupted:
        click.echo(f"medsr-infer: {interrupted}; re-run to continue (existing outputs are skipped)", err=True)
        sys.exit(130)
    sys.exit(1 if summary.failed else 0)


def _run_ray(walk: Walk, input_files: set[Path], load: object, options: object, overwrite: bool,
             max_pixels: int, quiet: bool, outdir: Path) -> None:
    """The same job on Ray Data (medsr.scale.ray_batch); same guarantees, summary and exit status."""
    from tqdm import tqdm

    from medsr.scale import ray_batch

    summary, jobs = _start_run(walk, input_files)
    t0 = time.perf_counter()
    interrupted: str | None = None
    bar = tqdm(total=len(jobs), desc="files (ray)", unit="file", disable=quiet)
    try:
        for r in ray_batch.run([(j.src, j.dst) for j in jobs], load, options, overwrite=overwrite, max_pixels=max_pixels,  # type: ignore[arg-type]
                               quiet=quiet):
            bar.update(1)
            if r["status"] == ray_batch.WRITTEN:
                summary.written += 1
                summary.megapixels += r["lr_pixels"] / 1e6
            elif r["status"] == ray_batch.SKIPPED:
                summary.skipped += 1
            else:
                summary.failed.append((Path(r["src"]), r["message"]))
                tqdm.write(f"FAILED {r['message']}", file=sys.stderr)
    except KeyboardInterrupt as e:
        interrupted = f"interrupted ({e or 'SIGINT'}); files being written were abandoned (no partial outputs)"
    except Exception as e:  # Ray itself failed (no cluster, a worker could not load the model): one clear line
        bar.close()
        click.echo(f"medsr-infer: the Ray run failed: {_short(e)}", err=True)
        sys.exit(2)
    bar.close()
    _finish(summary, walk.ignored, time.perf_counter() - t0, outdir, interrupted)


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
