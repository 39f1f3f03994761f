"""The series stage: CT/MR instances are collected per series (SeriesInstanceUID) and, once a series is stable
(no instance of it for ``[volumes] stable_age`` seconds, from the committed timestamps), upscaled as one volume:
read with :func:`medsr.volumes.read_volume` (geometry checked), restored through-plane by the injected
:class:`~medsr.pacs.protocol.VolumeMethod`, written as a derived series
(:func:`medsr.volumes.write_dicom_series`) into the spool, and each derived slice queued as an outgoing item
for the forward stage. One transaction queues the derived slices and closes the members (docs/pacs.md,
"CT and MR series").
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsr.pacs import identity
from medsr.pacs.failures import Outcome, SpoolFault, Verdict, classify_error, describe
from medsr.pacs.protocol import VolumeMethod
from medsr.pacs.queue import Item
from medsr.pacs.safe import printable
from medsr.pacs.stages import WorkerStage

log = logging.getLogger("medsr.pacs")


class SeriesStage(WorkerStage):
    name = "series"

    def __init__(self, *args: Any, on_broken: Callable[[str], None], on_upscaled: Callable[[], None]) -> None:
        super().__init__(*args, on_broken=on_broken, on_upscaled=on_upscaled)
        self.work = self.queue.root / "work"  # a series' scratch and derived files until they are queued
        shutil.rmtree(self.work, ignore_errors=True)  # left by an earlier run: its members are worked again

    def run(self, method: VolumeMethod) -> None:
        while not self.stop.is_set():
            members = self._claim_series()
            if not members:
                continue
            try:
                broken = self._one(method, members)
            finally:
                with self._mu:
                    self.held.difference_update(m.id for m in members)
            if broken:
                return

    def _claim_series(self) -> list[Item]:
        try:
            with self._mu:
                members = self.queue.claim_series(self.config.volumes.stable_age)
                self.held.update(m.id for m in members)
        except SpoolFault as e:
            self._spool_errors += 1
            delay = self.backoff(self._spool_errors)
            log.warning("series: cannot read the queue (%s); retrying in %.1f s", printable(e), delay)
            self.stop.wait(delay)
            return []
        self._spool_errors = 0
        if not members:
            self.wake.wait(0.5)
            self.wake.clear()
        return members

    def _apply_all(self, series: str, members: list[Item], verdict: Verdict) -> None:
        """The verdict for every member of a collected series (one log line for the series)."""
        o = verdict.outcome
        cap = self.config.spool.max_attempts
        attempts = max(m.attempts for m in members)
        try:
            if o is Outcome.INPUT_BAD or (o in (Outcome.LOCAL_RETRY, Outcome.WORKER_BROKEN) and attempts + 1 >= cap):
                reason = verdict.reason if o is Outcome.INPUT_BAD else f"{verdict.reason}; {attempts + 1} attempt(s)"
                for m in members:
                    self.queue.dead(m, self.name, reason)
                self.metrics.failed.labels(self.name).inc()
                log.error("dead-lettered series %s (%d instance(s), items %d-%d): %s", series, len(members),
                          members[0].id, members[-1].id, reason)
                return
            if o is Outcome.SPOOL_ERROR:
                self._spool_errors += 1
                delay, count = self.backoff(self._spool_errors), False
            elif o is Outcome.WORKER_BROKEN:
                delay, count = 0.0, True
            else:
                delay, count = self.backoff(attempts + 1), True
            for m in members:
                self.queue.retry(m, verdict.reason, delay, count=count)
            self.metrics.retries.inc()
            log.warning("series %s failed (%s); retry in %.1f s", series, verdict.reason, delay)
        except SpoolFault as e:
            log.warning("series: cannot record the outcome of series %s (%s); it is given back later", series,
                        printable(e))

    def _one(self, method: VolumeMethod, members: list[Item]) -> bool:
        series = printable(members[0].series or "?", 64)
        # a re-sent instance within one collection: its latest copy is the one used
        latest: dict[str, Item] = {}
        for m in members:
            latest[m.key] = m
        used = sorted(latest.values(), key=lambda m: m.id)
        missing = [m for m in used if not self.queue.source_path(m).exists()]
        if missing:
            self._apply_all(series, members, Verdict(Outcome.INPUT_BAD, f"series {series}: {len(missing)} received "
                                                     f"file(s) missing from the spool (items {missing[0].id}...)"))
            return False
        full = self.spool_nearly_full()
        if full is not None:
            self._apply_all(series, members, full)
            return False
        job = self.work / f"{hashlib.sha256(series.encode()).hexdigest()[:16]}-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        try:
            try:
                files, lr_mp, factor = self._derive(method, series, used, job)
                note = (f"series {series}: {len(used)} instance(s) -> derived series {files[0][2]} "
                        f"({len(files)} instance(s), x{factor:g} through-plane) queued to forward")
                self.queue.series_upscaled(members, [(p, uid) for p, uid, _ in files], note)
            finally:
                shutil.rmtree(job, ignore_errors=True)
        except Exception as e:
            verdict = self._classify(e, series)
            self._apply_all(series, members, verdict)
            if verdict.outcome is Outcome.WORKER_BROKEN:
                self._on_broken(verdict.reason)
                return True
            return False
        self.metrics.upscaled(lr_mp, time.perf_counter() - t0)
        self._on_upscaled()
        log.info("upscaled %s", note)
        return False

    @staticmethod
    def _classify(e: BaseException, series: str) -> Verdict:
        from medsr.volumes import VolumeError

        if isinstance(e, VolumeError):
            if isinstance(e.__context__, OSError):  # writing the derived series into the spool failed
                return Verdict(Outcome.SPOOL_ERROR, f"spool: {describe(e)}")
            msg = printable(str(e), 300)
            return Verdict(Outcome.INPUT_BAD, msg if series in msg else f"series {series}: {msg}")
        return classify_error(e, "upscale")

    def _derive(self, method: VolumeMethod, series: str, used: list[Item],
                job: Path) -> tuple[list[tuple[Path, str, str]], float, float]:
        """Read, restore and write the series; [(derived file, SOP Instance UID, Series Instance UID)], the LR
        megapixels and the factor."""
        import pydicom

        from medsr.volumes import read_volume, write_dicom_series
        from medsr.volumes.throughplane import plan

        paths = [self.queue.source_path(m) for m in used]
        vol = read_volume(paths, series_uid=used[0].series)
        v = self.config.volumes
        p = plan(vol, factor=v.factor, target_spacing=v.spacing)
        for note in vol.meta.notes:
            log.info("series %s: %s", series, note)
        log.info("series %s: %d instance(s), %s", series, len(used), p.describe())
        job.mkdir(parents=True)
        out = method.upscale_volume(vol, factor=v.factor, spacing=v.spacing, workdir=job)
        written = write_dicom_series(out, vol, job / "out", weights_sha256=method.weights_sha256,
                                     model_id=method.model_id, factor=p.factor, syntax=self.config.destination.syntax)
        # an item's key is its SOP Instance UID (the receiver checked it against the data set's)
        content = identity.series_digest([
            (m.key, identity.pixel_digest(pydicom.dcmread(path, specific_tags=["PixelData"])))
            for m, path in zip(used, paths, strict=True)])
        src0 = vol.meta.datasets[0]
        files = []
        for f in written:
            ds = pydicom.dcmread(f)
            identity.finish_series(ds, src0, content, self.config.model.uid_root)
            ds.save_as(f, enforce_file_format=True)
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files.append((f, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
        lr_mp = vol.shape[0] * vol.shape[1] * vol.shape[2] / 1e6
        return files, lr_mp, p.factor

