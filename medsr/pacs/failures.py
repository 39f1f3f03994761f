"""The one failure classification table of medsr-node: every stage asks it what a failure means.

=====================  ==========================================================  =================================
outcome                what                                                        what the node does
=====================  ==========================================================  =================================
``DELIVERED``          C-STORE 0x0000, warnings 0x0001 / 0xB000-0xBFFF,           the item is done
                       0x0111 (duplicate: the PACS already holds it), HTTP 200
``INPUT_BAD``          the received instance cannot be decoded or upscaled         dead-letter at once, with the reason
                       (corrupt pixels, unsupported encoding, bad header)
``WORKER_BROKEN``      the engine is broken (CUDA / cuDNN / cuBLAS error,          the item goes back to the queue
                       device-side assert, OpenVINO ``bad_alloc``, NVML)            (counted as an attempt); the node
                                                                                   reports unhealthy and exits
                                                                                   non-zero for its supervisor
``LOCAL_RETRY``        host memory pressure (MemoryError, "out of memory")         retry with backoff, dead after
                                                                                   ``spool.max_attempts``
``SPOOL_ERROR``        a filesystem or SQLite error on the spool (ENOSPC, EACCES,  retry with backoff, never dropped,
                       EIO, "database or disk is full")                            never dead-lettered
``DEST_TRANSIENT``     C-STORE 0xA700-0xA7FF (out of resources), 0x0110            retry with backoff; dead-lettered
                       (processing failure), 0x0213 (resource limitation),         once the item has been failing
                       0xFE00 (cancel); HTTP 408/429/500/502/503/504 and           for ``destination.retry_for`` s
                       401/403 (credentials: a config fix, not the item's fault);
                       association aborted, timed out, refused or rejected;
                       connection errors
``DEST_PERMANENT``     any other failure status (0xA900 data set does not match,   dead-letter at once, with the status
                       0xC000-0xCFFF cannot understand, 0x0122 SOP class not
                       supported, 0x0124 not authorised, ...); other HTTP 4xx;
                       STOW-RS FailedSOPSequence
=====================  ==========================================================  =================================
"""

from __future__ import annotations

import enum
import errno
import sqlite3
from dataclasses import dataclass


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    INPUT_BAD = "input_bad"
    WORKER_BROKEN = "worker_broken"
    LOCAL_RETRY = "local_retry"
    SPOOL_ERROR = "spool_error"
    DEST_TRANSIENT = "dest_transient"
    DEST_PERMANENT = "dest_permanent"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    #: the destination as a whole is unavailable (connection refused, association rejected, out of
    #: resources): every forwarder pauses, not only this item
    destination_down: bool = False


# ------------------------------------------------------------------------------- DIMSE statuses

#: C-STORE statuses that mean "the destination holds the instance"
DELIVERED_STATUSES = frozenset({0x0000, 0x0001, 0x0111})
#: C-STORE statuses worth retrying (the destination is busy or short of resources)
TRANSIENT_STATUSES = frozenset({0x0110, 0x0213, 0xFE00})


def classify_status(code: int, where: str = "destination") -> Verdict:
    """What a C-STORE response status means."""
    text = f"{where}: C-STORE status 0x{code:04X}"
    if code in DELIVERED_STATUSES or 0xB000 <= code <= 0xBFFF:
        return Verdict(Outcome.DELIVERED, text)
    if 0xA700 <= code <= 0xA7FF:
        return Verdict(Outcome.DEST_TRANSIENT, f"{text} (out of resources)", destination_down=True)
    if code in TRANSIENT_STATUSES:
        return Verdict(Outcome.DEST_TRANSIENT, f"{text} (temporary)")
    return Verdict(Outcome.DEST_PERMANENT, f"{text} (refused)")


# ------------------------------------------------------------------------------- HTTP (STOW-RS)

TRANSIENT_HTTP = frozenset({0, 401, 403, 408, 425, 429, 500, 502, 503, 504})


def classify_http(code: int, where: str = "STOW-RS") -> Verdict:
    """What an HTTP status of a STOW-RS request means (0: no response)."""
    if 200 <= code < 300:
        return Verdict(Outcome.DELIVERED, f"{where}: HTTP {code}")
    if code in TRANSIENT_HTTP:
        down = code in (0, 429, 502, 503, 504)
        return Verdict(Outcome.DEST_TRANSIENT, f"{where}: HTTP {code or 'no response'}", destination_down=down)
    return Verdict(Outcome.DEST_PERMANENT, f"{where}: HTTP {code} (refused)")


# ------------------------------------------------------------------------------- exceptions

#: engine messages that mean the worker (device, driver, runtime) is broken, not the instance
BROKEN_WORKER_MARKERS = (
    "cuda error", "cudaerror", "cublas_status", "cudnn_status", "cufft_status", "curand_status",
    "device-side assert", "illegal memory access", "nvml", "bad_alloc", "cuda driver", "no cuda gpus",
    "ze_result_error", "cl_out_of_resources", "hip error",
)

#: OSError numbers that are the spool's (disk full, permissions, I/O) rather than the input's
SPOOL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                          errno.ENOENT, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class SpoolFault(RuntimeError):
    """A filesystem or database error on the spool, wrapped so that no stage mistakes it for bad input."""


def describe(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, printable ASCII only (safe for logs and reason fields)."""
    from medsr.pacs.safe import printable

    return printable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, limit)


def classify_error(e: BaseException, stage: str) -> Verdict:
    """What an exception raised while working on an item means. ``stage``: "upscale" or "forward"."""
    if isinstance(e, (SpoolFault, sqlite3.Error)):
        return Verdict(Outcome.SPOOL_ERROR, f"spool: {describe(e)}")
    text = str(e).lower()
    if any(m in text for m in BROKEN_WORKER_MARKERS) and not isinstance(e, OSError):
        return Verdict(Outcome.WORKER_BROKEN, f"engine broken: {describe(e)}")
    if isinstance(e, MemoryError) or "out of memory" in text:
        return Verdict(Outcome.LOCAL_RETRY, f"out of memory: {describe(e)}")
    if stage == "forward":
        if isinstance(e, (OSError, TimeoutError, ConnectionError)):
            return Verdict(Outcome.DEST_TRANSIENT, f"network: {describe(e)}", destination_down=True)
        return Verdict(Outcome.DEST_PERMANENT, describe(e))
    if isinstance(e, OSError) and e.errno in SPOOL_ERRNOS and e.filename is not None:
        return Verdict(Outcome.SPOOL_ERROR, f"spool: {describe(e)}")
    return Verdict(Outcome.INPUT_BAD, f"cannot upscale: {describe(e)}")
