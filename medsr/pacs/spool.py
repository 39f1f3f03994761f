"""Migration of the folder-per-state spool of medsr-node <= 0.1 into the work queue (medsr/pacs/queue.py).

The old layout: ``incoming/`` and ``claimed/`` (sources), ``outgoing/`` (derived instances), ``dead/``
(``<uid>.dcm`` + ``<uid>.reason.json``), ``tmp/``. At start each file becomes a queue item in the matching
state (claimed sources count as received: they were interrupted), then the old folders are removed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path

from medsr.pacs.queue import WorkQueue

log = logging.getLogger("medsr.pacs")

LEGACY = {"incoming": "received", "claimed": "received", "outgoing": "outgoing", "dead": "dead"}


def migrate_legacy(queue: WorkQueue) -> int:
    """Adopt the files of an old-layout spool into ``queue``; returns how many. Idempotent: a file is
    removed from its old folder only after its row is committed."""
    n = 0
    for folder, state in LEGACY.items():
        d = queue.root / folder
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.dcm"), key=lambda q: q.stat().st_mtime_ns):
            reason, derived = None, folder == "outgoing"
            if folder == "dead":
                info = p.with_name(p.stem + ".reason.json")
                try:
                    meta = json.loads(info.read_text())
                    reason, derived = meta.get("reason"), meta.get("file") == "derived instance"
                except (OSError, ValueError, AttributeError):
                    reason = None
            _adopt(queue, p, p.stem, state, reason or ("dead-lettered before migration" if state == "dead" else None),
                   derived)
            n += 1
        for p in d.iterdir():
            p.unlink(missing_ok=True)
        d.rmdir()
    if n:
        log.info("spool: migrated %d item(s) from the old folder layout", n)
    return n


def _adopt(queue: WorkQueue, path: Path, key: str, state: str, reason: str | None, derived: bool) -> None:
    name = uuid.uuid4().hex
    suffix = ".out.dcm" if derived else ".dcm"  # a derived instance (outgoing, or dead at forward)
    dst = queue.payload / f"{name}{suffix}"
    os.replace(path, dst)
    now = time.time()

    def run(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO items (key, file, state, due, last_error, dead_stage, created, updated) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (key, name, state, now, reason, "migrated" if state == "dead" else None, now, now))

    queue._tx(run)
