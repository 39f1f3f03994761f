"""The upscale and forward stages: each worker claims an item from the queue, works on it, and turns the
outcome (medsr/pacs/failures.py) into a queue transition. A transition that fails on a spool error leaves
the item leased; the node's housekeeping gives it back (``WorkQueue.release_orphans``), so nothing is
ever held only in memory and nothing waits for a restart.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from medsr.pacs import identity
from medsr.pacs.config import NodeConfig
from medsr.pacs.failures import Outcome, SpoolFault, Verdict, classify_error, describe
from medsr.pacs.metrics import Metrics
from medsr.pacs.protocol import DicomUpscaler
from medsr.pacs.queue import Item, WorkQueue
from medsr.pacs.receive import free_mb
from medsr.pacs.safe import printable

log = logging.getLogger("medsr.pacs")


class Stage:
    """What both stages share: the leases held by live workers, backoff, and applying a verdict."""

    name = "stage"

    def __init__(self, config: NodeConfig, queue: WorkQueue, metrics: Metrics, stop: threading.Event) -> None:
        self.config = config
        self.queue = queue
        self.metrics = metrics
        self.stop = stop
        self.wake = threading.Event()
        self.held: set[int] = set()
        self._mu = threading.RLock()
        self._spool_errors = 0

    def backoff(self, attempts: int) -> float:
        s = self.config.spool
        return min(s.backoff_max, s.backoff_initial * 2 ** min(30, max(0, attempts - 1))) * random.uniform(0.8, 1.0)

    def _claim(self, state: str) -> Item | None:
        try:
            with self._mu:  # claimed and held in one step: housekeeping never sees a lease nobody holds
                item = self.queue.claim(state)
                if item is not None:
                    self.held.add(item.id)
        except SpoolFault as e:
            self._spool_errors += 1
            delay = self.backoff(self._spool_errors)
            log.warning("%s: cannot read the queue (%s); retrying in %.1f s", self.name, printable(e), delay)
            self.stop.wait(delay)
            return None
        self._spool_errors = 0
        if item is None:
            self.wake.wait(0.25)
            self.wake.clear()
            return None
        return item

    def _done_with(self, item: Item) -> None:
        with self._mu:
            self.held.discard(item.id)

    def held_ids(self) -> set[int]:
        """Items a worker of this stage holds; call with ``self._mu`` held to keep it true while using it."""
        with self._mu:
            return set(self.held)

    def apply(self, item: Item, verdict: Verdict) -> None:
        """Move a failed item on; on a spool error the item stays leased (housekeeping gives it back)."""
        o = verdict.outcome
        cap = self.config.spool.max_attempts
        try:
            if o in (Outcome.INPUT_BAD, Outcome.DEST_PERMANENT):
                self.queue.dead(item, self.name, verdict.reason)
                self.metrics.failed.labels(self.name).inc()
                log.error("dead-lettered %s (item %d) at %s: %s", item.key, item.id, self.name, verdict.reason)
            elif o is Outcome.SPOOL_ERROR:
                self._spool_errors += 1
                delay = self.backoff(self._spool_errors)
                self.queue.retry(item, verdict.reason, delay, count=False)
                self.metrics.retries.inc()
                log.warning("%s of %s: %s; retrying in %.1f s", self.name, item.key, verdict.reason, delay)
            elif o is Outcome.DEST_TRANSIENT and item.failing_since is not None and \
                    time.time() - item.failing_since >= self.config.destination.retry_for:
                reason = f"{verdict.reason}; still failing after destination.retry_for = " \
                         f"{self.config.destination.retry_for:g} s"
                self.queue.dead(item, self.name, reason)
                self.metrics.failed.labels(self.name).inc()
                log.error("dead-lettered %s (item %d) at %s: %s", item.key, item.id, self.name, reason)
            elif o is Outcome.LOCAL_RETRY and item.attempts + 1 >= cap:
                reason = f"{verdict.reason}; {item.attempts + 1} attempt(s)"
                self.queue.dead(item, self.name, reason)
                self.metrics.failed.labels(self.name).inc()
                log.error("dead-lettered %s (item %d) at %s: %s", item.key, item.id, self.name, reason)
            elif o is Outcome.WORKER_BROKEN:
                if item.attempts + 1 >= cap:
                    self.queue.dead(item, self.name, f"{verdict.reason}; {item.attempts + 1} attempt(s)")
                    self.metrics.failed.labels(self.name).inc()
                else:
                    self.queue.retry(item, verdict.reason, 0.0)
            else:  # LOCAL_RETRY, DEST_TRANSIENT
                delay = self.backoff(item.attempts + 1)
                self.queue.retry(item, verdict.reason, delay)
                self.metrics.retries.inc()
                log.warning("%s of %s failed (%s); retry %d in %.1f s", self.name, item.key, verdict.reason,
                            item.attempts + 1, delay)
        except SpoolFault as e:
            log.warning("%s: cannot record the outcome of item %d (%s); it is given back later", self.name,
                        item.id, printable(e))


class WorkerStage(Stage):
    """A stage that runs the model (single instances, CT/MR series): reports a broken worker and each
    upscaled item to the node, and keeps the last part of the spool for the queue."""

    def __init__(self, *args: Any, on_broken: Callable[[str], None], on_upscaled: Callable[[], None]) -> None:
        super().__init__(*args)
        self._on_broken = on_broken
        self._on_upscaled = on_upscaled

    def spool_nearly_full(self) -> Verdict | None:
        """A SPOOL_ERROR verdict (retried later) when the spool has under half of listen.min_free_mb free: the
        last part of the disk is for the queue's own database, so that forwarding can free space."""
        reserve = self.config.listen.min_free_mb / 2
        try:
            low = free_mb(self.queue.root) < reserve
        except OSError:
            low = False
        if not low:
            return None
        return Verdict(Outcome.SPOOL_ERROR, f"spool nearly full (under {reserve:g} MB free): waiting for "
                                            "forwarded instances to free space")


class UpscaleStage(WorkerStage):
    name = "upscale"

    def run(self, up: DicomUpscaler) -> None:
        while not self.stop.is_set():
            item = self._claim("received")
            if item is None:
                continue
            try:
                broken = self._one(up, item)
            finally:
                self._done_with(item)
            if broken:
                return  # this worker is out; the node reports unhealthy

    def _one(self, up: DicomUpscaler, item: Item) -> bool:
        import pydicom

        path = self.queue.source_path(item)
        if not path.exists():
            self.apply(item, Verdict(Outcome.INPUT_BAD, "the received file is missing from the spool"))
            return False
        full = self.spool_nearly_full()
        if full is not None:
            self.apply(item, full)
            return False
        t0 = time.perf_counter()
        try:
            src = pydicom.dcmread(path, force=True)
            lr_mp = int(src.Rows) * int(src.Columns) * int(src.get("NumberOfFrames", 1) or 1) / 1e6
            derived = up.upscale_dicom(src, dicom_syntax=self.config.destination.syntax)
            identity.finish(derived, src, self.config.model.uid_root)
            self.queue.write_derived(item, lambda f: derived.save_as(f, enforce_file_format=True))
            self.queue.upscaled(item, str(derived.SOPInstanceUID))
        except Exception as e:
            verdict = classify_error(e, "upscale")
            self.apply(item, verdict)
            if verdict.outcome is Outcome.WORKER_BROKEN:
                self._on_broken(verdict.reason)
                return True
            return False
        self.metrics.upscaled(lr_mp, time.perf_counter() - t0)
        self._on_upscaled()
        log.debug("upscaled %s (item %d)", item.key, item.id)
        return False


class ForwardStage(Stage):
    name = "forward"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._down_until = 0.0
        self._down_count = 0
        #: items sent successfully whose "delivered" could not be recorded yet (spool error): recorded by
        #: housekeeping, never sent again
        self.unrecorded: dict[int, Item] = {}

    def run(self, make_forwarder: Callable[[], Any]) -> None:
        fw = make_forwarder()
        try:
            while not self.stop.is_set():
                self._wait_destination()
                item = self._claim("outgoing")
                if item is None:
                    fw.close()  # idle: release the association
                    continue
                try:
                    self._one(fw, item)
                finally:
                    self._done_with(item)
        finally:
            fw.close()

    def held_ids(self) -> set[int]:
        with self._mu:
            return set(self.held) | set(self.unrecorded)

    def _one(self, fw: Any, item: Item) -> None:
        import pydicom

        path = self.queue.derived_path(item)
        try:
            ds = pydicom.dcmread(path)
        except FileNotFoundError:
            self.apply(item, Verdict(Outcome.INPUT_BAD, "the derived file is missing from the spool"))
            return
        except OSError as e:
            self.apply(item, Verdict(Outcome.SPOOL_ERROR, f"spool: {describe(e)}"))
            return
        except Exception as e:
            self.apply(item, Verdict(Outcome.INPUT_BAD, f"derived file unreadable: {describe(e)}"))
            return
        try:
            verdict = fw.send(ds)
        except Exception as e:  # a forwarder bug or an unexpected library error
            verdict = classify_error(e, "forward")
        if verdict.outcome is Outcome.DELIVERED:
            self._destination_up()
            self.metrics.done.inc()
            log.info("forwarded %s as %s", item.key, ds.SOPInstanceUID)
            note = None if verdict.reason.endswith("0x0000") else verdict.reason
            try:
                self.queue.delivered(item, note)
            except SpoolFault as e:
                with self._mu:
                    self.unrecorded[item.id] = item
                log.warning("forwarded %s but cannot record it yet (%s)", item.key, printable(e))
            return
        if verdict.destination_down:
            self._destination_down(verdict.reason)
        self.apply(item, verdict)

    def record_unrecorded(self) -> None:
        with self._mu:
            pending = list(self.unrecorded.values())
        for item in pending:
            try:
                self.queue.delivered(item)
            except SpoolFault:
                return
            with self._mu:
                self.unrecorded.pop(item.id, None)

    def _wait_destination(self) -> None:
        while not self.stop.is_set():
            left = self._down_until - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, 0.5))

    def _destination_down(self, why: str) -> None:
        with self._mu:
            self._down_count += 1
            delay = self.backoff(self._down_count)
            self._down_until = max(self._down_until, time.monotonic() + delay)
        if self.metrics.set_destination(False) or self._down_count % 10 == 0:
            log.warning("destination unavailable: %s; pausing %.1f s (nothing is dropped)", why, delay)

    def _destination_up(self) -> None:
        with self._mu:
            self._down_count = 0
            self._down_until = 0.0
        if self.metrics.set_destination(True):
            log.info("destination is back: forwarding resumes")
