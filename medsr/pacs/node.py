"""medsr-node: receive stage (SCP) -> work queue -> upscale stage -> forward stage (C-STORE / STOW-RS).

Guarantees:

- an instance is acknowledged (C-STORE success) only after it is on disk (file data and folder entry
  fsynced, queue row committed); from then on it is delivered, dead-lettered with a reason, or still in
  the queue after a crash, and the next start resumes it (a crash counts as an attempt);
- every failure goes through one table (medsr/pacs/failures.py) and ends in a queue transition; a spool
  error (disk full, unwritable) is retried with backoff by the running node, never needing a restart;
- a broken engine (CUDA error, bad_alloc) takes its worker out: the item goes back to the queue and the
  node reports unhealthy (``Node.broken``; the CLI exits with status 3 for its supervisor to restart it);
- logs name SOP Instance UIDs at most (no patient or study attributes), with control characters escaped.

The node depends on an injected :class:`~medsr.pacs.protocol.DicomUpscaler` per worker, and for CT/MR
series on one injected :class:`~medsr.pacs.protocol.VolumeMethod` (medsr/pacs/series.py); it never builds
models itself (medsr/cli/node.py does).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from medsr.pacs.config import NodeConfig
from medsr.pacs.forward import make_forwarder
from medsr.pacs.metrics import Metrics
from medsr.pacs.protocol import DicomUpscaler, VolumeMethod
from medsr.pacs.queue import WorkQueue
from medsr.pacs.receive import Receiver, free_mb
from medsr.pacs.safe import printable
from medsr.pacs.series import SeriesStage
from medsr.pacs.spool import migrate_legacy
from medsr.pacs.stages import ForwardStage, UpscaleStage

log = logging.getLogger("medsr.pacs")


class Node:
    """The whole node; ``start()`` / ``stop()``, or ``with Node(cfg, upscalers=[...]) as node: ...``.

    ``volume``: the volume method for CT/MR series (``[volumes]``); without one the node accepts no CT/MR
    instances, whatever ``[volumes] enabled`` says (the CLI always gives one when it is enabled)."""

    def __init__(self, config: NodeConfig, *, upscalers: list[DicomUpscaler], registry: Any = None,
                 volume: VolumeMethod | None = None) -> None:
        if not upscalers:
            raise ValueError("a node needs at least one upscaler (medsr.cli.node.build_upscalers builds them)")
        self.config = config
        self.metrics = Metrics(registry)
        self._upscalers = list(upscalers)
        self._volume = volume if config.volumes.enabled else None
        self.series: SeriesStage | None = None
        self.queue: WorkQueue | None = None
        self.receiver: Receiver | None = None
        self.upscale: UpscaleStage | None = None
        self.forward: ForwardStage | None = None
        self._stop = threading.Event()
        self.broken = threading.Event()  # set when a worker found its engine broken: restart the process
        self.broken_reason = ""
        self._threads: list[threading.Thread] = []
        self._http: Any = None
        self._reserve = 0
        self.started = False

    # lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.receiver.port if self.receiver else 0

    @property
    def metrics_port(self) -> int:
        return int(self._http.server_address[1]) if self._http else 0

    @property
    def healthy(self) -> bool:
        return self.started and not self.broken.is_set()

    def start(self) -> None:
        cfg = self.config
        self.queue = q = WorkQueue(cfg.spool.path)
        try:
            migrate_legacy(q)
            self._reserve = int(min(8e6, self.config.listen.min_free_mb * 1e6 / 4))
            q.ensure_reserve(self._reserve)
            resumed, dead = q.recover(cfg.spool.max_attempts)
            if self._volume is None:
                n = q.dead_series_members("CT/MR series member, but this node runs without the volume path "
                                          "([volumes] enabled = false); requeue it once it is on")
                if n:
                    log.warning("spool: dead-lettered %d CT/MR series member(s): [volumes] is off", n)
            q.prune(cfg.spool.keep_delivered_days * 86400)
            c = q.counts()
            if resumed or dead or c["received"] or c["outgoing"]:
                log.info("spool: resuming %d to upscale, %d to forward (%d interrupted, %d dead-lettered after "
                         "repeated crashes)", c["received"], c["outgoing"], resumed, dead)
            self.metrics.track_depth("upscale", lambda: q.count("received") + q.count("processing"))
            self.metrics.track_depth("forward", lambda: q.count("outgoing"))
            self.metrics.track_depth("dead", lambda: q.count("dead"))
            self.metrics.healthy.set_function(lambda: 1.0 if self.healthy else 0.0)
            self.upscale = UpscaleStage(cfg, q, self.metrics, self._stop, on_broken=self._on_broken,
                                        on_upscaled=lambda: self.forward.wake.set() if self.forward else None)
            self.forward = ForwardStage(cfg, q, self.metrics, self._stop)
            if self._volume is not None:
                self.series = SeriesStage(cfg, q, self.metrics, self._stop, on_broken=self._on_broken,
                                          on_upscaled=lambda: self.forward.wake.set() if self.forward else None)
            self.receiver = Receiver(cfg, q, self.metrics, stopping=self._stop.is_set,
                                     on_queued=self.upscale.wake.set, volumes=self._volume is not None)
            self.receiver.start()
            if cfg.metrics.port:
                self._start_metrics()
        except BaseException:
            self.stop()
            raise
        for i, up in enumerate(self._upscalers):
            self._spawn(f"medsr-upscale-{i}", self.upscale.run, up)
        if self.series is not None:
            self._spawn("medsr-series-0", self.series.run, self._volume)
        sources = cfg.accepted_sop_classes if self._volume is not None else cfg.filters.sop_classes
        for i in range(cfg.spool.forwarders):
            self._spawn(f"medsr-forward-{i}", self.forward.run,
                        lambda: make_forwarder(cfg.destination, cfg.listen.ae_title, sources))
        self._spawn("medsr-housekeeping", self._housekeeping)
        self.started = True
        log.info(
            "listening as %s on %s:%d%s (calling AEs allowed: %s); forwarding to %s; %d worker(s), spool %s%s",
            cfg.listen.ae_title, cfg.listen.address, self.port, " (TLS)" if cfg.listen.tls_cert else "",
            ", ".join(cfg.listen.allowed_calling_aets), self._dest_text(), len(self._upscalers), cfg.spool.path,
            f"; CT/MR series upscaled as volumes after {cfg.volumes.stable_age:g} s without a new instance"
            if self.series is not None else "",
        )

    def _dest_text(self) -> str:
        d = self.config.destination
        return d.url if d.kind == "dicomweb" else f"{d.ae_title}@{d.host}:{d.port}"

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        t = threading.Thread(target=self._guard, args=(name, target, *args), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _guard(self, name: str, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as e:  # a bug: the items it held are given back by housekeeping
            log.exception("%s died: %s", name, printable(e))
            self._on_broken(f"{name} died: {type(e).__name__}")

    def _on_broken(self, reason: str) -> None:
        self.broken_reason = reason
        if not self.broken.is_set():
            log.error("worker broken (%s): the node is unhealthy; its item is back in the queue. "
                      "Restart the node (the CLI exits with status 3 for its supervisor)", reason)
        self.broken.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let workers finish the item in hand (up to ``timeout`` s); whatever is not finished
        stays in the queue for the next start (given back without counting an attempt)."""
        self._stop.set()
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        busy = [t.name for t in self._threads if t.is_alive()]
        if busy:
            log.warning("stopping with %d thread(s) still busy (%s); their items stay in the queue",
                        len(busy), ", ".join(busy))
        self._threads = []
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self.queue is not None:
            if self.forward is not None:
                self.forward.record_unrecorded()
            if not busy:
                try:
                    for state in ("processing", "outgoing"):
                        for item in self.queue.items(state):
                            if item.lease == self.queue.run_id:
                                self.queue.release(item)
                except Exception as e:  # the next start counts them as interrupted: one attempt each
                    log.warning("cannot give back leased items (%s)", printable(e))
            log.info("stopped: %s", self.metrics.status_line())
            self.queue.close()
            self.queue = None
        self.started = False

    # housekeeping ------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        """Every second: record deliveries a spool error kept from being recorded, give back leases no worker
        holds (a transition that failed), and log a status line now and then."""
        last_status = time.monotonic()
        interval = self.config.metrics.status_interval
        n = 0
        while not self._stop.wait(1.0):
            q, up, fw, se = self.queue, self.upscale, self.forward, self.series
            if q is None or up is None or fw is None:
                continue
            fw.record_unrecorded()
            n += 1
            try:
                if free_mb(q.root) > self.config.listen.min_free_mb:
                    q.ensure_reserve(self._reserve)
            except OSError:
                pass
            try:
                with up._mu, fw._mu, (se._mu if se is not None else contextlib.nullcontext()):
                    # no claim can slip between the snapshot and the release
                    held = up.held_ids() | fw.held_ids() | (se.held_ids() if se is not None else set())
                    given = q.release_orphans(held, up.backoff(min(n, 6)))
                n = 0 if not given else n
                if given:
                    log.info("gave back %d item(s) whose last step failed on the spool", given)
                    up.wake.set()
                    fw.wake.set()
                    if se is not None:
                        se.wake.set()
            except Exception as e:
                log.warning("housekeeping: spool not writable yet (%s)", printable(e))
            if interval > 0 and time.monotonic() - last_status >= interval:
                last_status = time.monotonic()
                log.info("status: %s", self.metrics.status_line())

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        m = self.config.metrics
        self._http, _ = start_http_server(m.port, addr=m.address, registry=self.metrics.registry)
