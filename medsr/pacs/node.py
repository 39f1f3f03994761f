"""medsr-node: Storage SCP -> durable spool -> Upscaler workers -> forwarders (C-STORE / STOW-RS).

Guarantees:

- an instance is acknowledged (C-STORE success) only after it is on disk (data and directory entry
  fsynced); anything acknowledged is forwarded, dead-lettered with a reason, or still in the spool
  after a crash, and a restart resumes it;
- derived UIDs are deterministic (source UID + model), so a re-sent source or a replay after a crash
  gives the same instance at the destination, never a second one;
- logs name SOP Instance UIDs at most (no patient or study attributes).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import re
import threading
import time
from typing import Any

from medsr.pacs.config import DEFAULT_SOP_CLASSES, NodeConfig
from medsr.pacs.forward import DestinationDown, Refused, make_forwarder, tcp_nodelay
from medsr.pacs.metrics import Metrics
from medsr.pacs.spool import Spool

log = logging.getLogger("medsr.pacs")

#: transfer syntaxes the SCP accepts (uncompressed, deflate, and what medsr decodes via pylibjpeg)
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

# C-STORE statuses
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000


class Scheduler:
    """A thread-safe queue of keys with due times (for backoff)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, int]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()

    def put(self, key: str, delay: float = 0.0, attempts: int = 0) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), key, attempts))
            self._cv.notify()

    def get(self, timeout: float = 0.5) -> tuple[str, int] | None:
        """The next due (key, attempts), or None after ``timeout`` seconds with nothing due."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    _, _, key, attempts = heapq.heappop(self._heap)
                    return key, attempts
                if now >= end:
                    return None
                wait = end - now
                if self._heap:
                    wait = min(wait, self._heap[0][0] - now)
                self._cv.wait(max(0.001, wait))

    def has_due(self) -> bool:
        with self._cv:
            return bool(self._heap) and self._heap[0][0] <= time.monotonic()

    def __len__(self) -> int:
        with self._cv:
            return len(self._heap)


def _clean(text: str, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _describe(e: BaseException) -> str:
    return _clean(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


def _transient(e: BaseException) -> bool:
    """Errors worth retrying the upscale for (memory pressure); the rest are deterministic."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _is_medsr_derived(ds: Any) -> bool:
    from medsr.io.dicom import SOFTWARE

    image_type = ds.get("ImageType", None)
    first = str(image_type[0] if image_type and not isinstance(image_type, str) else image_type or "")
    desc = str(ds.get("DerivationDescription", "") or "")  # "... (medsr 0.1.0, model NAME, weights ...)"
    return first.upper() == "DERIVED" and re.search(rf"\({re.escape(SOFTWARE)}( [^,()]*)?, model ", desc) is not None


class Node:
    """The whole node; ``start()`` / ``stop()``, or ``with Node(cfg) as node: ...``.

    ``upscalers``: ready :class:`medsr.Upscaler` objects (one worker each) instead of building them
    from ``config.model``.
    """

    def __init__(self, config: NodeConfig, *, upscalers: list[Any] | None = None, registry: Any = None) -> None:
        self.config = config
        self.metrics = Metrics(registry)
        self._upscalers = upscalers
        self._sop_classes = set(config.filters.sop_classes)
        self._modalities = set(config.filters.modalities)
        self.spool: Spool | None = None
        self.work = Scheduler()
        self.fwd = Scheduler()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fwd_inflight: set[str] = set()
        self._fwd_lock = threading.Lock()
        self._down_until = 0.0
        self._down_count = 0
        self._server: Any = None
        self._http: Any = None
        self.started = False

    # lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else 0

    @property
    def metrics_port(self) -> int:
        return int(self._http.server_address[1]) if self._http else 0

    def build_upscalers(self) -> list[Any]:
        from medsr import Upscaler

        m = self.config.model
        if m.threads:
            import torch

            torch.set_num_threads(m.threads)
        ups = []
        for dev in m.devices:  # the loading rule of medsr-infer (runtime and precision from the file and device)
            ups.append(Upscaler.load(str(m.engine) if m.engine is not None else m.name, device=dev,
                                     precision=m.precision, tile=m.tile, overlap=m.overlap, batch=m.batch))
        return ups

    def start(self) -> None:
        cfg = self.config
        if self._upscalers is None:
            self._upscalers = self.build_upscalers()
        self.spool = Spool(cfg.spool.path)
        try:
            incoming, outgoing = self.spool.recover()
            for key in incoming:
                self.work.put(key)
            for key in outgoing:
                self.fwd.put(key)
            if incoming or outgoing:
                log.info("spool: resuming %d to upscale, %d to forward", len(incoming), len(outgoing))
            sp = self.spool
            self.metrics.track_depth("upscale", lambda: sp.count("incoming") + sp.count("claimed"))
            self.metrics.track_depth("forward", lambda: sp.count("outgoing"))
            self.metrics.track_depth("dead", lambda: sp.count("dead"))
            self._start_scp()
            if cfg.metrics.port:
                self._start_metrics()
        except BaseException:
            self.stop()
            raise
        for i, up in enumerate(self._upscalers):
            self._spawn(f"medsr-upscale-{i}", self._upscale_loop, up)
        for i in range(cfg.spool.forwarders):
            self._spawn(f"medsr-forward-{i}", self._forward_loop)
        if cfg.metrics.status_interval > 0:
            self._spawn("medsr-status", self._status_loop)
        self.started = True
        log.info(
            "listening as %s on %s:%d (calling AEs allowed: %s); forwarding to %s; %d worker(s), spool %s",
            cfg.listen.ae_title, cfg.listen.address, self.port, ", ".join(cfg.listen.allowed_calling_aets),
            self._dest_text(), len(self._upscalers), cfg.spool.path,
        )

    def _dest_text(self) -> str:
        d = self.config.destination
        return d.url if d.kind == "dicomweb" else f"{d.ae_title}@{d.host}:{d.port}"

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let workers finish the instance in hand (up to ``timeout`` s); whatever is
        not finished stays in the spool for the next start."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            for assoc in list(getattr(self._server, "active_associations", [])):
                try:
                    assoc.abort()
                except Exception:  # pragma: no cover
                    pass
            self._server = None
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        busy = [t.name for t in self._threads if t.is_alive()]
        if busy:
            log.warning("stopping with %d thread(s) still busy (%s); their instances stay in the spool",
                        len(busy), ", ".join(busy))
        self._threads = []
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self.spool is not None:
            if not busy:
                for key in self.spool.keys("claimed"):
                    self.spool.unclaim(key)
            log.info("stopped: %s", self.metrics.status_line())
            self.spool.close()
            self.spool = None
        self.started = False

    # SCP ---------------------------------------------------------------------------------------
    def _start_scp(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        cfg = self.config.listen
        ae = AE(ae_title=cfg.ae_title)
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
        ae.maximum_associations = 16
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        known = set()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
            known.add(cx.abstract_syntax)
        for uid in self._sop_classes - known:  # configured private/new SOP classes
            ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_CONN_OPEN, tcp_nodelay),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = ae.start_server((cfg.address, cfg.port), block=False, evt_handlers=handlers)

    def _on_rejected(self, event: Any) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        self.metrics.rejected.labels("calling_aet").inc()
        log.warning(
            "association from %r at %s rejected: calling AE title not in listen.allowed_calling_aets",
            calling[:16], event.assoc.requestor.address,
        )

    def _refuse(self, status: int, reason: str, uid: str, comment: str, detail: str) -> Any:
        from pydicom.dataset import Dataset

        if self.config.filters.on_mismatch == "ignore" and reason in ("modality",):
            self.metrics.ignored.inc()
            log.info("ignored %s: %s", uid, detail)
            return SUCCESS
        self.metrics.rejected.labels(reason).inc()
        log.warning("refused %s: %s", uid, detail)
        ds = Dataset()
        ds.Status = status
        ds.ErrorComment = comment[:64]
        return ds

    def _on_store(self, event: Any) -> Any:
        req = event.request
        uid = str(req.AffectedSOPInstanceUID or "")
        sop_class = str(req.AffectedSOPClassUID or "")
        shown = uid if len(uid) <= 64 else uid[:61] + "..."
        if sop_class not in self._sop_classes:
            return self._refuse(
                SOP_CLASS_NOT_SUPPORTED, "sop_class", shown, f"SOP class not accepted: {sop_class}",
                f"SOP class {sop_class} is not in filters.sop_classes "
                f"({DEFAULT_SOP_CLASSES.get(sop_class, 'not an accepted image class')})",
            )
        try:
            ds = event.dataset
            modality = str(ds.get("Modality", "") or "").strip().upper()
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            has_pixels = "PixelData" in ds
            derived = _is_medsr_derived(ds)
        except Exception as e:
            return self._refuse(
                CANNOT_UNDERSTAND, "unreadable", shown, "dataset cannot be decoded",
                f"the dataset cannot be decoded ({type(e).__name__})",
            )
        if self._modalities and modality not in self._modalities:
            return self._refuse(
                CANNOT_UNDERSTAND, "modality", shown, f"modality not accepted: {modality or 'none'}"[:64],
                f"modality {modality or '(none)'} is not in filters.modalities ({', '.join(sorted(self._modalities))})",
            )
        if not has_pixels or rows <= 0 or cols <= 0:
            return self._refuse(CANNOT_UNDERSTAND, "no_pixels", shown, "no pixel data", "the instance holds no pixel data")
        if rows * cols * frames > self.config.filters.max_pixels:
            return self._refuse(
                CANNOT_UNDERSTAND, "too_large", shown, "image too large for this node",
                f"{cols}x{rows}x{frames} pixels exceed filters.max_pixels = {self.config.filters.max_pixels}",
            )
        if derived:
            self.metrics.ignored.inc()
            log.info("ignored %s: already a medsr-derived instance (routing loop guard)", shown)
            return SUCCESS
        spool = self.spool
        if spool is None or self._stop.is_set():
            return self._refuse(OUT_OF_RESOURCES, "stopping", shown, "node is stopping", "node is stopping")
        key = spool.key_for(uid)
        try:
            spool.put_incoming(key, event.encoded_dataset(include_meta=True))
        except OSError as e:
            return self._refuse(
                OUT_OF_RESOURCES, "spool", shown, "cannot spool the instance",
                f"cannot write to the spool ({e.strerror or type(e).__name__})",
            )
        self.metrics.received.inc()
        self.work.put(key)
        log.debug("received %s", shown)
        return SUCCESS

    # upscale workers ---------------------------------------------------------------------------
    def _backoff(self, attempts: int) -> float:
        s = self.config.spool
        base = min(s.backoff_max, s.backoff_initial * 2 ** max(0, attempts - 1))
        return base * random.uniform(0.8, 1.0)

    def _upscale_loop(self, up: Any) -> None:
        while not self._stop.is_set():
            item = self.work.get(0.25)
            if item is None:
                continue
            try:
                self._upscale_one(up, *item)
            except Exception as e:  # never let a worker die: the instance stays in the spool
                log.error("upscale worker: unexpected %s; instance %s left in the spool", _describe(e), item[0])

    def _upscale_one(self, up: Any, key: str, attempts: int) -> None:
        import pydicom

        spool = self.spool
        assert spool is not None
        path = spool.claim(key)
        if path is None:
            return  # taken by another worker or already done
        t0 = time.perf_counter()
        try:
            src = pydicom.dcmread(path, force=True)
            lr_mp = int(src.Rows) * int(src.Columns) * int(src.get("NumberOfFrames", 1) or 1) / 1e6
            derived = up.upscale_dicom(src, dicom_syntax=self.config.destination.syntax)
        except Exception as e:
            attempts += 1
            if _transient(e) and attempts < self.config.spool.max_attempts:
                self.metrics.retries.inc()
                spool.unclaim(key)
                self.work.put(key, self._backoff(attempts), attempts)
                log.warning("upscale of %s failed (%s); retry %d", key, _describe(e), attempts)
                return
            reason = f"cannot upscale: {_describe(e)}"
            spool.dead_letter("claimed", key, "upscale", reason, attempts)
            self.metrics.failed.labels("upscale").inc()
            log.error("dead-lettered %s: %s", key, reason)
            return
        dt = time.perf_counter() - t0
        spool.put_outgoing(key, derived)
        spool.remove("claimed", key)
        self.metrics.upscaled(lr_mp, dt)
        self.fwd.put(key)
        log.debug("upscaled %s in %.0f ms", key, dt * 1e3)

    # forwarders --------------------------------------------------------------------------------
    def _wait_destination(self) -> None:
        while not self._stop.is_set():
            left = self._down_until - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, 0.5))

    def _forward_loop(self) -> None:
        fw = make_forwarder(self.config.destination, self.config.listen.ae_title, self.config.filters.sop_classes)
        try:
            while not self._stop.is_set():
                self._wait_destination()
                item = self.fwd.get(0.25)
                if item is None:
                    fw.close()  # idle: release the association
                    continue
                try:
                    self._forward_one(fw, *item)
                except Exception as e:  # never let a forwarder die
                    log.error("forwarder: unexpected %s; instance %s left in the spool", _describe(e), item[0])
                    self.fwd.put(item[0], self._backoff(item[1] + 1), item[1] + 1)
        finally:
            fw.close()

    def _forward_one(self, fw: Any, key: str, attempts: int) -> None:
        import pydicom

        spool = self.spool
        assert spool is not None
        with self._fwd_lock:
            if key in self._fwd_inflight:
                self.fwd.put(key, 0.2, attempts)
                return
            self._fwd_inflight.add(key)
        try:
            path = spool.path("outgoing", key)
            try:
                inode = path.stat().st_ino
                ds = pydicom.dcmread(path)
            except FileNotFoundError:
                return  # already forwarded (a duplicate queue entry)
            except Exception as e:
                spool.dead_letter("outgoing", key, "forward", f"derived file unreadable: {_describe(e)}", attempts)
                self.metrics.failed.labels("forward").inc()
                return
            try:
                fw.send(ds)
            except DestinationDown as e:
                self._destination_down(str(e))
                self.fwd.put(key, 0.0, attempts)
                return
            except (Refused, Exception) as e:
                attempts += 1
                reason = str(e) if isinstance(e, Refused) else _describe(e)
                if attempts >= self.config.spool.max_attempts:
                    spool.dead_letter("outgoing", key, "forward", reason, attempts)
                    self.metrics.failed.labels("forward").inc()
                    log.error("dead-lettered %s after %d attempt(s): %s", key, attempts, reason)
                else:
                    self.metrics.retries.inc()
                    self.fwd.put(key, self._backoff(attempts), attempts)
                    log.warning("forward of %s failed (%s); retry %d", key, reason, attempts)
                return
            self._destination_up()
            if not spool.remove("outgoing", key, inode=inode):
                self.fwd.put(key)  # a newer derived file replaced it meanwhile: send that one too
            self.metrics.done.inc()
            log.info("forwarded %s as %s", key, ds.SOPInstanceUID)
        finally:
            with self._fwd_lock:
                self._fwd_inflight.discard(key)

    def _destination_down(self, why: str) -> None:
        with self._fwd_lock:
            self._down_count += 1
            delay = self._backoff(self._down_count)
            self._down_until = max(self._down_until, time.monotonic() + delay)
        if self.metrics.set_destination(False) or self._down_count % 10 == 0:
            log.warning("destination down: %s; retrying in %.1f s (nothing is dropped)", why, delay)

    def _destination_up(self) -> None:
        with self._fwd_lock:
            self._down_count = 0
            self._down_until = 0.0
        if self.metrics.set_destination(True):
            log.info("destination is back: forwarding resumes")

    # status ------------------------------------------------------------------------------------
    def _status_loop(self) -> None:
        while not self._stop.wait(self.config.metrics.status_interval):
            log.info("status: %s", self.metrics.status_line())

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        m = self.config.metrics
        self._http, _ = start_http_server(m.port, addr=m.address, registry=self.metrics.registry)
