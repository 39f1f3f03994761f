"""Archive-scale batch on Ray Data: the job of ``medsr-infer`` over a Ray cluster.

The driver walks the inputs exactly as the local CLI does (``medsr.batch.collect_jobs``); the file list
becomes a Ray Dataset of (src, dst) rows and flows through three stages:

1. **read** (Ray tasks): refuse an output that is the input, skip an existing output, read the image with the
   header pixel limit (``medsr.io.read_image``);
2. **upscale** (an actor pool, ``map_batches`` with :class:`UpscaleWorker`): each actor loads one
   :class:`medsr.Upscaler` once and upscales the images it is given (``num_gpus`` per actor on GPU clusters);
3. **write** (Ray tasks): atomic write (``medsr.io.write_image``: temp file + rename), never over an
   existing output unless asked.

A failure in any stage becomes that row's status (the message names the file), so one bad file never stops
the dataset; the driver counts and reports them like the local CLI. Every path must be reachable by every
worker (a shared filesystem; the driver makes them absolute, so a relative path works on a cluster); the
outputs are the local CLI's, bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: row statuses
WRITTEN, SKIPPED, FAILED = "written", "skipped", "failed"


@dataclass
class RayOptions:
    """Where and how wide: ``address`` None starts a local Ray on this machine; ``"auto"`` joins the
    cluster this machine belongs to; ``"ray://head:10001"`` connects a client to a remote cluster."""

    address: str | None = None
    workers: int | None = None  # upscale actors; None: one per GPU (device cuda) or per 2 CPUs of the cluster
    gpus_per_worker: float | None = None  # None: 1 when the device is CUDA, else 0
    cpus_per_worker: float = 1.0  # torch/OpenVINO threads of each actor follow this (Ray sets OMP_NUM_THREADS)


@dataclass
class LoadSpec:
    """What each actor loads: the arguments of :meth:`medsr.Upscaler.load` (plain values: sent to workers)."""

    spec: str | None = None
    runtime: str = "auto"
    device: str = "auto"
    precision: str | None = None
    config: Any = None  # a medsr.runtime.TileConfig (None: the defaults)
    dicom_syntax: str | None = None


def job_rows(jobs: list[tuple[Path, Path]]) -> list[dict[str, str]]:
    """The dataset's rows: absolute paths, made on the driver (Ray workers do not share its working
    directory: on a cluster with a shared filesystem a relative path would name another file, or none)."""
    return [{"src": str(Path(s).absolute()), "dst": str(Path(d).absolute())} for s, d in jobs]


def _row(src: str, dst: str, status: str = "", message: str = "", lr_pixels: int = 0, image: Any = None) -> dict[str, Any]:
    return {"src": src, "dst": dst, "status": status, "message": message, "lr_pixels": lr_pixels, "image": image}


def _message(src: str, e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    return msg if Path(src).name in msg else f"{src}: {msg}"


def read_stage(row: dict[str, Any], *, overwrite: bool, max_pixels: int | None) -> dict[str, Any]:
    """Ray task: one input read (or the reason it is skipped / failed)."""
    from medsr.api import check_output
    from medsr.io import read_image

    src, dst = row["src"], row["dst"]
    try:
        check_output(src, dst, overwrite=overwrite)
        return _row(src, dst, image=read_image(src, max_pixels=max_pixels))
    except FileExistsError:
        return _row(src, dst, SKIPPED)
    except Exception as e:  # a bad file is that row's failure, never the dataset's
        return _row(src, dst, FAILED, _message(src, e))


class UpscaleWorker:
    """Actor of the upscale stage: one :class:`medsr.Upscaler`, loaded once per actor."""

    def __init__(self, load: LoadSpec) -> None:
        from medsr.api import Upscaler

        self.up = Upscaler.load(load.spec, runtime=load.runtime, device=load.device, precision=load.precision,
                                config=load.config)
        self.dicom_syntax = load.dicom_syntax

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["src"]))]
        for r in rows:
            if r["status"]:
                continue
            img = r["image"]
            try:
                r["image"] = self.up.upscale_image(img, dicom_syntax=self.dicom_syntax)
                r["lr_pixels"] = int(img.height * img.width * img.frames)
            except Exception as e:
                r.update(status=FAILED, message=_message(r["src"], e), image=None)
        out: dict[str, Any] = {}
        for k in batch:
            col = np.empty(len(rows), dtype=object)
            col[:] = [r[k] for r in rows]
            out[k] = col
        return out


def write_stage(row: dict[str, Any], *, overwrite: bool) -> dict[str, Any]:
    """Ray task: the atomic write; the row comes back without its pixels."""
    from medsr.api import check_output
    from medsr.io import write_image

    src, dst, img = row["src"], row["dst"], row["image"]
    out = _row(src, dst, row["status"], row["message"], int(row["lr_pixels"] or 0))
    out.pop("image")
    if out["status"]:
        return out
    d = Path(dst)
    try:
        check_output(src, d, overwrite=overwrite)  # again: written meanwhile (another run) is never replaced
        d.parent.mkdir(parents=True, exist_ok=True)
        write_image(img, d)
        out["status"] = WRITTEN
    except FileExistsError:
        out["status"] = SKIPPED
    except Exception as e:
        out.update(status=FAILED, message=_message(src, e), lr_pixels=0)
    return out


def connect(options: RayOptions, quiet: bool = True) -> bool:
    """``ray.init`` for ``options.address``; True when this call started a local Ray (to shut down)."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("Ray is not installed (pip install 'medsr[scale]' or pip install 'ray[data]')") from e
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet, "configure_logging": True,
                          "logging_level": "warning"}
    if options.address in (None, "", "local"):
        ray.init(**kw)
        return True
    ray.init(address=options.address, **kw)
    return False


#: CPUs of one read or write task
IO_TASK_CPUS = 0.25


def _pool_size(options: RayOptions, device: str, io_cpus: float = 2 * IO_TASK_CPUS) -> tuple[int, float]:
    """(actors, GPUs per actor). The actors must leave ``io_cpus`` for the read and write tasks, else the
    pipeline would wait forever: a pool that does not fit is refused (ValueError)."""
    import ray

    res = ray.cluster_resources()
    cpus, have_gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    cuda = device.startswith("cuda") or (device == "auto" and have_gpus > 0)
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if cuda else 0.0)
    if options.workers:
        workers = options.workers
    elif gpus > 0:
        workers = max(1, int(have_gpus // gpus))
    else:
        workers = max(1, int(cpus) // 2)
    need = workers * options.cpus_per_worker + io_cpus
    if need > cpus:
        tasks = " plus the read/write tasks" if io_cpus else ""
        raise ValueError(f"{workers} upscale worker(s) of {options.cpus_per_worker:g} CPU each{tasks} "
                         f"need {need:g} CPUs; the Ray cluster has {cpus:g}: use fewer --workers")
    if gpus > 0 and workers * gpus > have_gpus:
        raise ValueError(f"{workers} upscale worker(s) of {gpus:g} GPU each need {workers * gpus:g} GPUs; "
                         f"the Ray cluster has {have_gpus:g}")
    return workers, gpus


def run(
    jobs: list[tuple[Path, Path]], load: LoadSpec, options: RayOptions, *, overwrite: bool = False,
    max_pixels: int | None = None, quiet: bool = True,
) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` [(src, dst)] on Ray; yields one result row per job as it completes:
    ``{"src", "dst", "status": written|skipped|failed, "message", "lr_pixels"}``."""
    if not jobs:
        return
    started = connect(options, quiet)
    try:
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = not quiet
        ctx.print_on_execution_start = not quiet
        workers, gpus = _pool_size(options, load.device)
        rows = job_rows(jobs)
        given = {r["src"]: (str(s), str(d)) for r, (s, d) in zip(rows, jobs, strict=True)}  # rows name jobs as given
        ds = ray.data.from_items(rows, override_num_blocks=min(len(jobs), 200))
        ds = ds.map(read_stage, fn_kwargs={"overwrite": overwrite, "max_pixels": max_pixels}, num_cpus=IO_TASK_CPUS)
        ds = ds.map_batches(
            UpscaleWorker, fn_constructor_kwargs={"load": load}, batch_size=1, batch_format="numpy",
            compute=ActorPoolStrategy(size=workers), num_gpus=gpus or None, num_cpus=options.cpus_per_worker,
        )
        ds = ds.map(write_stage, fn_kwargs={"overwrite": overwrite}, num_cpus=IO_TASK_CPUS)
        for r in ds.iter_rows():
            src, dst = given.get(r["src"], (r["src"], r["dst"]))
            yield {"src": src, "dst": dst, "status": r["status"], "message": str(r["message"] or "").replace(r["src"], src),
                   "lr_pixels": int(r["lr_pixels"] or 0)}
    finally:
        if started:
            import ray

            ray.shutdown()

