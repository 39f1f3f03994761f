"""The receive stage: a Storage SCP (pynetdicom) that admits peers, streams each C-STORE to disk and
checks it (size, header, UIDs, pixel limit) before anything is decoded; then the work queue owns it.

Resource bounds: datasets are received in chunks into ``<spool>/tmp`` (``STORE_RECV_CHUNKED_DATASET``),
never as one in-memory buffer; a PDU longer than the limit closes the connection before it is read; the
deflated transfer syntax is not offered (inflating is unbounded); a watchdog aborts an association whose
instance grows past ``listen.max_instance_mb`` or while the spool runs out of space; associations are
limited in total and per peer address, and silent ones are dropped after ``listen.network_timeout``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import ssl
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from medsr.pacs.config import DEFAULT_SOP_CLASSES, VOLUME_SOP_CLASSES, NodeConfig, is_uid
from medsr.pacs.failures import SpoolFault
from medsr.pacs.forward import tcp_nodelay
from medsr.pacs.metrics import Metrics
from medsr.pacs.queue import WorkQueue
from medsr.pacs.safe import printable

log = logging.getLogger("medsr.pacs")

#: transfer syntaxes the SCP accepts: uncompressed and what medsr decodes (pylibjpeg). Deflated Explicit VR
#: Little Endian is not offered: a few KiB of it inflate to gigabytes.
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
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

_PDU_CAP = [1 << 20]


def cap_pdu_length(limit: int) -> None:
    """Refuse any PDU whose announced length exceeds ``limit`` before reading it (pynetdicom reads a whole
    PDU into memory: a peer announcing 4 GiB would otherwise be buffered). Process-wide; the connection is
    closed as if the peer had dropped it."""
    from pynetdicom import transport

    _PDU_CAP[0] = limit
    cls = transport.AssociationSocket
    if getattr(cls.recv, "_medsr_capped", False):
        return
    original = cls.recv

    def recv(self: Any, nr_bytes: int) -> bytearray:
        if nr_bytes > _PDU_CAP[0]:
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the {_PDU_CAP[0]}-byte limit")
        return original(self, nr_bytes)

    recv._medsr_capped = True  # type: ignore[attr-defined]
    cls.recv = recv  # type: ignore[method-assign]


def server_ssl_context(cfg: Any) -> ssl.SSLContext | None:
    """TLS for the SCP from [listen] tls_cert/tls_key; with tls_ca, client certificates are required."""
    if cfg.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    if cfg.tls_ca is not None:
        ctx.load_verify_locations(cafile=str(cfg.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def is_medsr_derived(ds: Any) -> bool:
    from medsr.io.dicom import SOFTWARE

    image_type = ds.get("ImageType", None)
    first = str(image_type[0] if image_type and not isinstance(image_type, str) else image_type or "")
    desc = str(ds.get("DerivationDescription", "") or "")  # "... (medsr 0.1.0, model NAME, weights ...)"
    return first.upper() == "DERIVED" and re.search(rf"\({re.escape(SOFTWARE)}( [^,()]*)?, model ", desc) is not None


def free_mb(path: Any) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 1e6


def _close(assoc: Any) -> None:
    """End one association at shutdown. A-ABORT is defined only once the peer has sent its A-ASSOCIATE-RQ:
    aborting a bare connection (state Sta2: a port probe, or a peer that has not spoken yet) makes
    pynetdicom's reactor thread raise InvalidEventError (Evt15 in Sta2), so that one's connection is closed instead."""
    try:
        state = assoc.dul.state_machine.current_state
    except AttributeError:
        state = None
    try:
        if state in ("Sta1", "Sta2"):
            if assoc.dul.socket is not None:
                assoc.dul.socket.close()  # Evt17: Sta2 -> Sta1 at once (no wait for the ARTIM timer)
            assoc.kill()
        else:
            assoc.abort()
    except Exception:  # pragma: no cover - the connection is already gone
        pass


class Receiver:
    """The SCP. ``on_queued`` is called after each instance is durably queued (wakes the workers).
    ``volumes``: CT/MR image storage instances are accepted and queued as members of their series (the node
    has a volume upscaler and ``[volumes] enabled``)."""

    def __init__(self, config: NodeConfig, queue: WorkQueue, metrics: Metrics, *,
                 stopping: Callable[[], bool], on_queued: Callable[[], None], volumes: bool = False) -> None:
        self.config = config
        self.queue = queue
        self.metrics = metrics
        self._stopping = stopping
        self._on_queued = on_queued
        self._volume_classes = set(config.volumes.sop_classes) if volumes else set()
        self._sop_classes = set(config.filters.sop_classes) | self._volume_classes
        self._modalities = set(config.filters.modalities)
        self._peers = {aet: [ipaddress.ip_network(a, strict=False) for a in addrs]
                       for aet, addrs in config.listen.peers.items()}
        self._server: Any = None
        self._old_tempdir: str | None = None
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self.space_low = False

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else 0

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
        from pynetdicom.sop_class import Verification

        cfg = self.config.listen
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._old_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.queue.tmp)  # chunked datasets land on the spool's filesystem: a link, no copy
        cap_pdu_length(max(1 << 20, 2 * max(cfg.max_pdu_size, self.config.destination.max_pdu_size)))
        ae = AE(ae_title=cfg.ae_title)
        # pynetdicom's own limit counts silent connections too: a wide backstop behind _on_requested's limits
        ae.maximum_associations = 4 * cfg.max_associations + 32
        ae.maximum_pdu_size = cfg.max_pdu_size
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        ae.network_timeout = cfg.network_timeout
        known = set()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
            known.add(cx.abstract_syntax)
        for uid in self._sop_classes - known:  # configured private/new SOP classes
            ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_CONN_OPEN, tcp_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = ae.start_server((cfg.address, cfg.port), block=False, evt_handlers=handlers,
                                       ssl_context=server_ssl_context(cfg))
        self._stop.clear()
        self._watch = threading.Thread(target=self._watch_loop, name="medsr-receive-watch", daemon=True)
        self._watch.start()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            for assoc in list(getattr(self._server, "active_associations", [])):
                _close(assoc)
            self._server = None
        if self._watch is not None:
            self._watch.join(5)
            self._watch = None
        if tempfile.tempdir == str(self.queue.tmp):
            tempfile.tempdir = self._old_tempdir

    # admission ---------------------------------------------------------------------------------
    def _reject(self, event: Any, reason: str, detail: str, rsd: tuple[int, int, int]) -> None:
        self.metrics.rejected.labels(reason).inc()
        log.warning("association from %s rejected: %s", printable(event.assoc.requestor.address, 64), detail)
        event.assoc.acse.send_reject(*rsd)
        event.assoc.kill()

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title or "").strip()
        called = str(rq.called_ae_title or "").strip()
        peer = str(assoc.requestor.address)
        cfg = self.config.listen
        shown = printable(calling, 32)
        if called != cfg.ae_title:
            return self._reject(event, "called_aet", f"called AE title {printable(called, 32)!s} is not this node's "
                                f"({cfg.ae_title}); calling AE {shown}", (0x01, 0x01, 0x07))
        if calling not in cfg.allowed_calling_aets:
            return self._reject(event, "calling_aet", f"calling AE title {shown} not in listen.allowed_calling_aets",
                                (0x01, 0x01, 0x03))
        nets = self._peers.get(calling)
        if nets is not None:
            try:
                ip = ipaddress.ip_address(peer)
            except ValueError:
                ip = None
            if ip is None or not any(ip in n for n in nets):
                return self._reject(event, "peer_address", f"calling AE title {shown} may not connect from this "
                                    "address (listen.peers)", (0x01, 0x01, 0x03))
        # established associations (and this one): a silent TCP connection holds no slot (it is closed after
        # acse_timeout), nor does a rejected one, so a flood of them cannot lock out a real sender
        active = [a for a in list(self._server.active_associations if self._server else [])
                  if a.is_acceptor and (a.is_established or a is assoc)]
        if len(active) > cfg.max_associations:
            return self._reject(event, "busy", f"{len(active) - 1} associations open (listen.max_associations = "
                                f"{cfg.max_associations}); calling AE {shown}", (0x02, 0x03, 0x02))
        same = [a for a in active if str(a.requestor.address) == peer]
        if len(same) > cfg.max_per_peer:
            return self._reject(event, "peer_busy", f"{len(same) - 1} associations open from this address "
                                f"(listen.max_per_peer = {cfg.max_per_peer}); calling AE {shown}", (0x02, 0x03, 0x02))
        return None

    def _on_rejected(self, event: Any) -> None:  # pynetdicom's own limit (the backstop of _on_requested)
        self.metrics.rejected.labels("busy").inc()
        log.warning("association from %s rejected by pynetdicom (association limit)",
                    printable(event.assoc.requestor.address, 64))

    # C-STORE -----------------------------------------------------------------------------------
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
        ds.ErrorComment = printable(comment, 64)
        return ds

    def _on_store(self, event: Any) -> Any:
        req = event.request
        uid = str(req.AffectedSOPInstanceUID or "")
        sop_class = str(req.AffectedSOPClassUID or "")
        shown = printable(uid, 64)
        if self._stopping():
            return self._refuse(OUT_OF_RESOURCES, "stopping", shown, "node is stopping", "node is stopping")
        if sop_class not in self._sop_classes:
            return self._refuse(
                SOP_CLASS_NOT_SUPPORTED, "sop_class", shown, f"SOP class not accepted: {sop_class}",
                f"SOP class {printable(sop_class, 64)} is not in filters.sop_classes "
                f"({DEFAULT_SOP_CLASSES.get(sop_class) or VOLUME_SOP_CLASSES.get(sop_class) or 'not an accepted image class'}"
                f"{'; [volumes] is off' if sop_class in VOLUME_SOP_CLASSES else ''})",
            )
        if not is_uid(uid):
            return self._refuse(CANNOT_UNDERSTAND, "bad_uid", shown, "invalid Affected SOP Instance UID",
                                "the command's Affected SOP Instance UID is not a valid UID")
        lim = self.config.listen
        try:
            low = free_mb(self.queue.root) < lim.min_free_mb
        except OSError:
            low = True
        if low != self.space_low:
            self.space_low = low
            (log.warning if low else log.info)(
                "spool free space %s listen.min_free_mb = %g: C-STORE %s", "below" if low else "back above",
                lim.min_free_mb, "answers 0xA700 (out of resources)" if low else "accepted again")
        if low:
            return self._refuse(OUT_OF_RESOURCES, "spool_full", shown, "spool full, retry later",
                                f"spool free space below listen.min_free_mb = {lim.min_free_mb:g}")
        path = event.dataset_path
        try:
            size_mb = os.stat(path).st_size / 1e6
        except OSError as e:
            return self._refuse(OUT_OF_RESOURCES, "spool", shown, "cannot spool the instance",
                                f"received file unreadable ({e.strerror or type(e).__name__})")
        if size_mb > lim.max_instance_mb:
            return self._refuse(CANNOT_UNDERSTAND, "too_large", shown, "instance too large for this node",
                                f"{size_mb:.1f} MB exceeds listen.max_instance_mb = {lim.max_instance_mb:g}")
        refusal, derived, series = self._check_header(path, uid, sop_class, shown)
        if refusal is not None:
            return refusal
        if derived:
            self.metrics.ignored.inc()
            log.info("ignored %s: already a medsr-derived instance (routing loop guard)", shown)
            return SUCCESS
        calling = printable(str(event.assoc.requestor.ae_title).strip(), 16)
        try:
            self.queue.add(uid, path, calling_ae=calling, peer=str(event.assoc.requestor.address), series=series)
        except SpoolFault as e:
            return self._refuse(OUT_OF_RESOURCES, "spool", shown, "cannot spool the instance",
                                f"cannot write to the spool ({printable(e, 120)})")
        self.metrics.received.inc()
        self._on_queued()
        log.debug("received %s%s", shown, f" (series {printable(series, 64)})" if series else "")
        return SUCCESS

    def _check_header(self, path: Any, uid: str, sop_class: str, shown: str) -> tuple[Any, bool, str | None]:
        """Parse the header only (values over 4 KiB, pixel data included, stay on disk) and check it:
        (a refusal or None, whether it is a medsr-derived instance, the series it is collected into: a CT/MR
        instance of the volume path, else None)."""
        import pydicom

        try:
            ds = pydicom.dcmread(path, defer_size=4096)
            ds_uid = str(ds.get("SOPInstanceUID", "") or "")
            ds_class = str(ds.get("SOPClassUID", "") or "")
            other_uids = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID")]
            modality = str(ds.get("Modality", "") or "").strip().upper()
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            has_pixels = "PixelData" in ds
            derived = is_medsr_derived(ds)
        except Exception as e:
            return self._refuse(CANNOT_UNDERSTAND, "unreadable", shown, "dataset cannot be decoded",
                                f"the dataset cannot be decoded ({type(e).__name__})"), False, None
        if ds_uid != uid:
            return self._refuse(CANNOT_UNDERSTAND, "uid_mismatch", shown, "SOPInstanceUID differs from the command",
                                f"the data set's SOP Instance UID ({printable(ds_uid, 64)}) is not the command's"), False, None
        if ds_class != sop_class:
            return self._refuse(CANNOT_UNDERSTAND, "uid_mismatch", shown, "SOPClassUID differs from the command",
                                f"the data set's SOP Class UID ({printable(ds_class, 64)}) is not the command's"), False, None
        for other in other_uids:
            if other and not is_uid(other):
                return self._refuse(CANNOT_UNDERSTAND, "bad_uid", shown, "invalid Study or Series Instance UID",
                                    f"invalid Study or Series Instance UID {printable(other, 64)}"), False, None
        volume = sop_class in self._volume_classes
        series = other_uids[1] if volume else None
        if volume and not series:
            return self._refuse(CANNOT_UNDERSTAND, "bad_uid", shown, "no Series Instance UID",
                                "a CT/MR instance without Series Instance UID cannot join a series"), False, None
        if self._modalities and modality not in self._modalities and not volume:
            return self._refuse(
                CANNOT_UNDERSTAND, "modality", shown, f"modality not accepted: {modality or 'none'}",
                f"modality {printable(modality or '(none)', 20)} is not in filters.modalities "
                f"({', '.join(sorted(self._modalities))})",
            ), False, None
        if not has_pixels or rows <= 0 or cols <= 0:
            return self._refuse(CANNOT_UNDERSTAND, "no_pixels", shown, "no pixel data", "the instance holds no pixel data"), False, None
        if rows * cols * frames * max(1, samples) > self.config.filters.max_pixels:
            return self._refuse(
                CANNOT_UNDERSTAND, "too_large", shown, "image too large for this node",
                f"{cols}x{rows}x{frames}x{samples} pixels exceed filters.max_pixels = {self.config.filters.max_pixels}",
            ), False, None
        return None, derived, series

    # watchdog ----------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        lim = self.config.listen
        stale_after = 2 * max(lim.network_timeout, lim.dimse_timeout, lim.acse_timeout)
        n = 0
        while not self._stop.wait(0.5):
            server = self._server
            if server is None:
                continue
            try:
                low = free_mb(self.queue.root) < lim.min_free_mb / 2
            except OSError:
                low = False
            for assoc in list(server.active_associations):
                f = getattr(getattr(getattr(assoc, "dimse", None), "message", None), "_data_set_file", None)
                if f is None or f.closed:
                    continue
                try:
                    size_mb = os.fstat(f.fileno()).st_size / 1e6
                except (OSError, ValueError):
                    continue
                if size_mb > lim.max_instance_mb or low:
                    why = (f"instance over listen.max_instance_mb = {lim.max_instance_mb:g}" if not low
                           else "spool free space below half of listen.min_free_mb")
                    log.warning("aborting the association from %s: %s while receiving",
                                printable(assoc.requestor.address, 64), why)
                    self.metrics.rejected.labels("too_large" if not low else "spool_full").inc()
                    try:
                        assoc.abort()
                    finally:
                        try:
                            f.close()
                            os.unlink(f.name)
                        except (OSError, ValueError):
                            pass
            n += 1
            if n % 20 == 0:  # every ~10 s: partial receives of aborted associations
                self.queue.sweep_files(older_than=stale_after)
