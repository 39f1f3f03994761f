"""Volumes on Ray: ``medsr-infer vols/ -o out/ --ray`` for NIfTI/MGZ files and DICOM series.

A volume is large (a 512x512x300 CT is 150 MB of int16 before it is upscaled), so it never travels through
Ray's object store: the driver walks the inputs as the local CLI does (:func:`medsr.volumes.batch.split_inputs`),
checks the output rules, and sends each remaining volume's *paths* (absolute, resolved on the driver) to an
actor pool of :class:`VolumeWorker`. Each actor loads one :class:`medsr.volumes.VolumeUpscaler` once and runs
``upscale_file`` for one whole volume per call: it reads the input from the shared filesystem, reconstructs
it, writes the output itself (atomically, as the local path) and returns a small status dict.

Same rules as :func:`medsr.volumes.batch.run_volume_jobs`: an output that is an input fails, an existing
output is skipped unless ``overwrite``, a failed volume is reported and the others go on. An actor that dies
(e.g. killed for memory) fails its volume and is replaced. Every path must be reachable under the same name on
every node.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from medsr.scale.ray_batch import FAILED, SKIPPED, WRITTEN, LoadSpec, RayOptions, _pool_size, connect
from medsr.volumes.batch import VolumeJob


class LoadFailed(RuntimeError):
    """An actor could not load the volume model (missing weights, a 2D model, no runtime): the run stops."""


def job_row(job: VolumeJob) -> dict[str, Any]:
    """What an actor gets for one volume: plain values, absolute paths (workers do not share the driver's
    working directory)."""
    return {"src": str(job.src.absolute()), "dst": str(job.dst.absolute()),
            "files": [str(f.absolute()) for f in job.files] if job.files else None,
            "series_uid": job.series_uid}


class VolumeWorker:
    """Ray actor: one VolumeUpscaler, loaded once; one whole volume per :meth:`run` call."""

    def __init__(self, load: LoadSpec) -> None:
        from medsr.api import Upscaler
        from medsr.volumes import VolumeUpscaler
        from medsr.volumes.upscaler import DEFAULT_VOLUME_MODEL

        self.vu = VolumeUpscaler(Upscaler.load(load.spec or DEFAULT_VOLUME_MODEL, runtime=load.runtime,
                                               device=load.device, precision=load.precision, config=load.config))
        self.dicom_syntax = load.dicom_syntax

    def ready(self) -> str:
        return self.vu.upscaler.describe()  # type: ignore[union-attr]

    def run(self, row: dict[str, Any], *, overwrite: bool, factor: float | None, spacing: float | None,
            axis: int | None) -> dict[str, Any]:
        """Upscale and write one volume; ``{"status", "message", "log"}`` (never the voxels)."""
        lines: list[str] = []
        src: Any = [Path(f) for f in row["files"]] if row["files"] else Path(row["src"])
        try:
            self.vu.upscale_file(src, row["dst"], series_uid=row["series_uid"], overwrite=overwrite, axis=axis,
                                 factor=factor, spacing=spacing, log=lines.append, dicom_syntax=self.dicom_syntax)
        except FileExistsError:  # written meanwhile (another run): never replaced without overwrite
            return {"status": SKIPPED, "message": "", "log": lines}
        except Exception as e:  # this volume's failure, never the batch's
            return {"status": FAILED, "message": str(e) or type(e).__name__, "log": lines}
        return {"status": WRITTEN, "message": "", "log": lines}


def _result(job: VolumeJob, status: str, message: str = "", log: list[str] | None = None) -> dict[str, Any]:
    if message and str(job.src) not in message and str(job.src.absolute()) not in message:
        message = f"{job.src}: {message}"
    return {"src": job.src, "dst": job.dst, "status": status, "message": message, "log": log or []}


def run(
    jobs: list[VolumeJob], load: LoadSpec, options: RayOptions, *, overwrite: bool = False,
    factor: float | None = None, spacing: float | None = None, axis: int | None = None, quiet: bool = True,
    log: Callable[[str], object] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run the volume ``jobs`` on Ray; yields ``{"src", "dst", "status": written|skipped|failed, "message",
    "log": [lines]}`` per job as it completes (``src``/``dst`` as the jobs give them). Ray starts only when a
    volume needs work; :class:`LoadFailed` when the actors cannot load the model."""
    todo: list[VolumeJob] = []
    for j in jobs:  # on the driver, before Ray: the rules of run_volume_jobs
        if j.dst.exists() and j.dst.resolve() == j.src.resolve():
            yield _result(j, FAILED, f"output {j.dst} would overwrite an input; choose another -o")
        elif j.dst.exists() and not overwrite:
            yield _result(j, SKIPPED)
        else:
            todo.append(j)
    if not todo:
        return
    started = connect(options, quiet)
    actors: list[Any] = []
    try:
        import ray
        from ray.exceptions import RayActorError

        workers, gpus = _pool_size(options, load.device, io_cpus=0.0)  # no read/write tasks: the actors do both
        workers = min(workers, len(todo))
        actor_cls = ray.remote(VolumeWorker).options(num_cpus=options.cpus_per_worker, num_gpus=gpus or 0)

        def start(n: int, announce: bool = True) -> list[Any]:
            new = [actor_cls.remote(load) for _ in range(n)]
            actors.extend(new)
            try:
                described = ray.get([a.ready.remote() for a in new])
            except RayActorError as e:
                raise LoadFailed(str(e)) from e
            if log is not None and announce:
                log(f"volumes run on Ray: {len(actors)} worker(s), {described[0]}")
            return new

        pending = deque(todo)
        inflight: dict[Any, tuple[Any, VolumeJob]] = {}
        kw = {"overwrite": overwrite, "factor": factor, "spacing": spacing, "axis": axis}

        def submit(actor: Any) -> None:
            job = pending.popleft()
            inflight[actor.run.remote(job_row(job), **kw)] = (actor, job)

        for a in start(workers):
            submit(a)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, job = inflight.pop(ref)
            try:
                r = ray.get(ref)
            except RayActorError as e:  # the actor died with this volume (out of memory, killed): replace it
                yield _result(job, FAILED, f"the Ray worker died while upscaling this volume (out of memory?): "
                                           f"{_first_line(e)}")
                actors.remove(actor)
                ray.kill(actor)
                if not pending:
                    continue
                actor = start(1, announce=False)[0]
            except Exception as e:  # the call itself failed (e.g. serialization): this volume only
                yield _result(job, FAILED, _first_line(e))
            else:
                yield _result(job, r["status"], r["message"], r["log"])
            if pending:
                submit(actor)
    finally:
        _stop(actors, started)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _stop(actors: list[Any], started: bool) -> None:
    import ray

    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 -- already gone
            pass
    if started:
        ray.shutdown()
