"""Forwarding derived instances: C-STORE SCU to an AE, or DICOMweb STOW-RS to a URL.

``send(ds)`` returns a :class:`~medsr.pacs.failures.Verdict` from the classification table
(medsr/pacs/failures.py): delivered, destination transient (retried) or destination permanent (dead-letter).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from medsr.pacs.config import DestinationConfig
from medsr.pacs.failures import Outcome, Verdict, classify_http, classify_status
from medsr.pacs.safe import printable

log = logging.getLogger("medsr.pacs")

_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def tcp_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: disable Nagle on the association's socket. pynetdicom sends a C-STORE
    as several small writes; with Nagle on one side and delayed ACKs on the other each message waits
    ~40 ms (measured: 20 -> 220 small instances/s on loopback)."""
    import socket

    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # pragma: no cover - not a TCP socket
        pass


def keep_late_responses(event: Any) -> None:
    """EVT_CONN_OPEN handler for an SCU: never let pynetdicom's reactor thread swallow a C-STORE response.

    pynetdicom (3.0.4) pauses its reactor before ``send_c_store`` by clearing an event and polling a flag
    the reactor sets just *before* it waits on that event; a reactor thread descheduled between the two
    (a loaded machine) takes the response off the queue itself, logs "Received unexpected C-STORE service
    message" and drops it. The sender then waits out its DIMSE timeout, aborts and resends an instance
    the peer had stored: a 10-30 s stall and a duplicate delivery (seen in this project's fault tests on a
    busy 2-core machine). Here a response taken by the reactor while a ``send_*`` call is waiting (the
    pause event cleared) is put back on the queue that call is reading."""
    assoc = event.assoc
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and msg.is_valid_response and not assoc._reactor_checkpoint.is_set():
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request


def scu_open(event: Any) -> None:
    """EVT_CONN_OPEN for the node's (and its tests') C-STORE SCU: TCP_NODELAY and no swallowed responses."""
    tcp_nodelay(event)
    keep_late_responses(event)


def _clean(text: Any, limit: int = 120) -> str:
    return printable(text, limit)


def client_ssl_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A TLS client context: server certificate checked against ``ca`` (default: the system store), with a
    client certificate for mutual TLS when ``cert``/``key`` are given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class DicomForwarder:
    """C-STORE SCU; keeps one association open while there is work (``close`` releases it)."""

    def __init__(self, dest: DestinationConfig, calling_ae_title: str, sop_classes: tuple[str, ...]) -> None:
        from pynetdicom import AE

        self.dest = dest
        self.ae = AE(ae_title=calling_ae_title)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = dest.timeout
        self.ae.connection_timeout = dest.timeout
        self.ae.maximum_pdu_size = dest.max_pdu_size
        self._tls: tuple[ssl.SSLContext, str] | None = None
        if dest.tls_ca is not None or dest.tls_cert is not None:
            self._tls = (client_ssl_context(dest.tls_ca, dest.tls_cert, dest.tls_key), dest.tls_server_name or dest.host)
        self._sop_classes = list(dict.fromkeys(sop_classes))
        self._compressed: list[tuple[str, str]] = []  # (SOP class, transfer syntax) met so far
        self.assoc: Any = None

    @property
    def where(self) -> str:
        return f"{self.dest.ae_title}@{self.dest.host}:{self.dest.port}"

    def _contexts(self) -> list[Any]:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import build_context

        ctx = [build_context(s, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for s in self._sop_classes]
        ctx += [build_context(s, [ts]) for s, ts in self._compressed]
        return ctx[-128:]  # DICOM allows 128 proposed contexts; the latest needs win

    def _connect(self) -> Verdict | None:
        from pynetdicom import evt

        assoc = self.ae.associate(
            self.dest.host, self.dest.port, contexts=self._contexts(), ae_title=self.dest.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, scu_open)], tls_args=self._tls,
        )
        if assoc.is_established:
            self.assoc = assoc
            return None
        if assoc.is_rejected:
            why = f"{self.where} rejected the association (check its AE configuration for this node)"
        else:
            why = f"{self.where} cannot be reached (connection refused, aborted or timed out)"
        return Verdict(Outcome.DEST_TRANSIENT, why, destination_down=True)

    def close(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            except Exception:  # pragma: no cover - a broken socket on release
                pass
            self.assoc = None

    def _abort(self) -> None:
        if self.assoc is not None:
            try:
                self.assoc.abort()
            except Exception:  # pragma: no cover
                pass
            self.assoc = None

    def send(self, ds: Any) -> Verdict:
        sop = str(ds.SOPClassUID)
        ts = str(ds.file_meta.TransferSyntaxUID)
        if sop not in self._sop_classes:
            self._sop_classes.append(sop)
            self.close()
        if ts not in _UNCOMPRESSED and (sop, ts) not in self._compressed:
            self._compressed.append((sop, ts))
            self.close()
        if self.assoc is None or not self.assoc.is_established:
            failed = self._connect()
            if failed is not None:
                return failed
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in self.assoc.accepted_contexts}
        if (sop, ts) not in accepted and ts not in _UNCOMPRESSED and any(
            (sop, u) in accepted for u in _UNCOMPRESSED
        ):
            # the destination takes this SOP class uncompressed only: send a decompressed copy. Lossless either
            # way, so it is the same instance: keep its UID (pydicom would mint a new one, breaking idempotence)
            import copy

            ds = copy.deepcopy(ds)
            ds.decompress(generate_instance_uid=False)
        try:
            status = self.assoc.send_c_store(ds)
        except ValueError:  # no accepted presentation context for this SOP class / transfer syntax
            self._abort()
            return Verdict(Outcome.DEST_PERMANENT,
                           f"{self.where} accepts no presentation context for SOP class {sop}, transfer syntax {ts}")
        except (RuntimeError, OSError) as e:
            self._abort()
            return Verdict(Outcome.DEST_TRANSIENT, f"{self.where}: association lost while sending ({type(e).__name__})")
        if not status or "Status" not in status:
            self._abort()
            return Verdict(Outcome.DEST_TRANSIENT, f"{self.where}: no C-STORE response (association aborted or timed out)")
        code = int(status.Status)
        verdict = classify_status(code, self.where)
        comment = _clean(status.get("ErrorComment", ""), 64)
        if comment and verdict.outcome is not Outcome.DELIVERED:
            verdict = Verdict(verdict.outcome, f"{verdict.reason}: {comment}", verdict.destination_down)
        return verdict


class StowForwarder:
    """DICOMweb STOW-RS (dicomweb-client); one request per instance. Bearer token or basic auth, a CA
    bundle and a client certificate from [destination]."""

    def __init__(self, dest: DestinationConfig) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.dest = dest
        session = requests.Session()
        if dest.tls_ca is not None:
            session.verify = str(dest.tls_ca)
        if dest.tls_cert is not None and dest.tls_key is not None:
            session.cert = (str(dest.tls_cert), str(dest.tls_key))
        if dest.token_file is not None:
            session.headers["Authorization"] = "Bearer " + dest.token_file.read_text().strip()
        elif dest.username and dest.password_file is not None:
            session.auth = (dest.username, dest.password_file.read_text().rstrip("\n"))
        self.client = DICOMwebClient(url=dest.url, session=session, timeout=dest.timeout)
        self.client.set_http_retry_params(retry=False)  # medsr-node retries itself, with the queue

    def close(self) -> None:
        pass

    def send(self, ds: Any) -> Verdict:
        import requests

        where = f"STOW-RS {self.dest.url}"
        try:
            response = self.client.store_instances([ds])
        except requests.exceptions.HTTPError as e:
            return classify_http(e.response.status_code if e.response is not None else 0, where)
        except requests.exceptions.RequestException as e:
            return Verdict(Outcome.DEST_TRANSIENT, f"{where} cannot be reached ({type(e).__name__})",
                           destination_down=True)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            try:
                code = int(failed[0].get("FailureReason", 0xC000) or 0xC000)
            except (TypeError, ValueError):
                code = 0xC000
            return classify_status(code, where)
        return Verdict(Outcome.DELIVERED, where)


def make_forwarder(dest: DestinationConfig, calling_ae_title: str, sop_classes: tuple[str, ...]) -> Any:
    if dest.kind == "dicomweb":
        return StowForwarder(dest)
    return DicomForwarder(dest, dest.calling_ae_title or calling_ae_title, sop_classes)
