"""The work queue of medsr-node (SQLite WAL + payload files): states, leases, crash counting, per-key lock."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def _q(tmp_path: Path, lock: bool = True):
    from medsr.pacs import WorkQueue

    return WorkQueue(tmp_path / "spool", lock=lock)


def test_state_machine_and_files(tmp_path: Path) -> None:
    q = _q(tmp_path)
    try:
        i = q.add("1.2.3", b"source bytes")
        item = q.claim("received")
        assert item is not None and item.id == i and item.state == "processing" and item.lease == q.run_id
        assert q.claim("received") is None  # leased: nobody else gets it
        assert q.source_path(item).read_bytes() == b"source bytes"
        q.write_derived(item, lambda f: f.write(b"derived"))
        q.upscaled(item, "9.9.9")
        assert not q.source_path(item).exists()
        out = q.claim("outgoing")
        assert out is not None and out.derived_uid == "9.9.9"
        q.delivered(out)
        assert not q.derived_path(out).exists()
        assert q.counts()["delivered"] == 1 and q.get(i).state == "delivered"
        assert not list(q.payload.iterdir())
    finally:
        q.close()


def test_the_periodic_sweep_never_deletes_an_instance_being_acknowledged(tmp_path: Path) -> None:
    """Issue 20's lost instance: the receiver's periodic sweep ran between ``add``'s payload write and its row
    commit, found a file with no row and deleted it; the instance was acknowledged and never delivered."""
    q = _q(tmp_path)
    try:
        real_tx = q._tx
        swept: list[int] = []

        def tx_with_a_sweep_in_the_window(fn, durable=False):
            if durable:  # add()'s INSERT: the payload file is on disk, its row not yet committed
                swept.append(q.sweep_files(older_than=60.0))
            return real_tx(fn, durable)

        q._tx = tx_with_a_sweep_in_the_window  # type: ignore[method-assign]
        i = q.add("1.2.3", b"source bytes")
        q._tx = real_tx  # type: ignore[method-assign]
        assert swept == [0]
        item = q.get(i)
        assert q.source_path(item).read_bytes() == b"source bytes"
        # a real orphan (no row) is removed once old enough, and at start (older_than 0)
        orphan = q.payload / "0123abcd.dcm"
        orphan.write_bytes(b"x")
        assert q.sweep_files(older_than=60.0) == 0 and orphan.exists()
        old = time.time() - 120
        import os

        os.utime(orphan, (old, old))
        assert q.sweep_files(older_than=60.0) == 1 and not orphan.exists()
        orphan.write_bytes(b"x")
        assert q.sweep_files() == 1 and not orphan.exists()
        assert q.source_path(item).exists()  # an item's file is never swept
    finally:
        q.close()


def test_a_crash_counts_as_an_attempt_and_a_poison_item_goes_dead(tmp_path: Path) -> None:
    from medsr.pacs import WorkQueue

    q = _q(tmp_path)
    q.add("1.2.3", b"x")
    q.close()
    for crash in range(1, 4):  # a node that dies while upscaling it, three times
        q = WorkQueue(tmp_path / "spool")
        resumed, dead = q.recover(max_attempts=3)
        item = q.claim("received")
        if crash < 3:
            assert item is not None and item.attempts == crash - 1
        q.close()  # no release: the next open sees a lease of a dead run
    q = WorkQueue(tmp_path / "spool")
    try:
        resumed, dead = q.recover(max_attempts=3)
        assert (resumed, dead) == (0, 1)
        (item,) = q.items("dead")
        assert item.crashes == 3 and "crash" in (item.last_error or "") and item.dead_stage == "upscale"
        assert q.source_path(item).exists()  # kept for requeue
        assert q.requeue() == 1 and q.get(item.id).state == "received" and q.get(item.id).attempts == 0
    finally:
        q.close()


def test_per_key_lock_keeps_a_resend_apart(tmp_path: Path) -> None:
    q = _q(tmp_path)
    try:
        first = q.add("1.2.3", b"first")
        second = q.add("1.2.3", b"second")  # a re-send while the first is being upscaled
        other = q.add("1.2.4", b"other")
        a = q.claim("received")
        assert a is not None and a.id == first
        b = q.claim("received")
        assert b is not None and b.id == other  # the re-send waits for the first copy
        assert q.claim("received") is None
        assert q.source_path(a).read_bytes() == b"first"  # untouched by the re-send
        q.write_derived(a, lambda f: f.write(b"d1"))
        q.upscaled(a, "9.1")
        assert q.claim("received") is None  # still outgoing: same key
        q.delivered(q.claim("outgoing"))
        c = q.claim("received")
        assert c is not None and c.id == second and q.source_path(c).read_bytes() == b"second"
    finally:
        q.close()


def test_retry_backoff_and_orphan_release(tmp_path: Path) -> None:
    q = _q(tmp_path)
    try:
        q.add("1.2.3", b"x")
        item = q.claim("received")
        item = q.retry(item, "busy", delay=60)
        assert item.state == "received" and item.attempts == 1 and item.last_error == "busy"
        assert item.failing_since is not None
        assert q.claim("received") is None  # not due yet
        q.add("1.2.4", b"y")
        lost = q.claim("received")  # a worker whose last transition failed: the lease stays
        assert q.release_orphans(held=set(), delay=0) == 1
        again = q.claim("received")
        assert again is not None and again.id == lost.id and again.attempts == 0
    finally:
        q.close()


def test_legacy_spool_is_migrated(tmp_path: Path) -> None:
    from medsr.pacs.spool import migrate_legacy

    root = tmp_path / "spool"
    for d in ("incoming", "claimed", "outgoing", "dead", "tmp"):
        (root / d).mkdir(parents=True)
    (root / "incoming" / "1.1.dcm").write_bytes(b"a")
    (root / "claimed" / "1.2.dcm").write_bytes(b"b")
    (root / "outgoing" / "1.3.dcm").write_bytes(b"c")
    (root / "dead" / "1.4.dcm").write_bytes(b"d")
    (root / "dead" / "1.4.reason.json").write_text('{"reason": "refused"}')
    q = _q(tmp_path)
    try:
        assert migrate_legacy(q) == 4
        c = q.counts()
        assert (c["received"], c["outgoing"], c["dead"]) == (2, 1, 1)
        assert q.items("dead")[0].last_error == "refused"
        out = q.items("outgoing")[0]
        assert q.derived_path(out).read_bytes() == b"c"
        assert not (root / "incoming").exists() and migrate_legacy(q) == 0
    finally:
        q.close()


def test_enqueue_and_claim_rate(tmp_path: Path) -> None:
    """Durable enqueue (fsynced file + committed row) and claim + finish, printed (pytest -s); no timing is
    asserted. The figure chose SQLite: far above what upscaling sustains on this hardware."""
    q = _q(tmp_path)
    n = 200
    try:
        t0 = time.perf_counter()
        for i in range(n):
            q.add(f"1.2.{i}", b"x" * 4096)
        t1 = time.perf_counter()
        for _ in range(n):
            item = q.claim("received")
            q.write_derived(item, lambda f: f.write(b"y" * 4096))
            q.upscaled(item, "1")
            q.delivered(q.claim("outgoing"))
        t2 = time.perf_counter()
        assert q.counts()["delivered"] == n
        print(f"\nqueue: {n / (t1 - t0):.0f} durable enqueues/s, {n / (t2 - t1):.0f} full item cycles/s")
    finally:
        q.close()


def test_pacs_never_imports_the_api_above_it() -> None:
    """medsr.pacs takes its upscalers injected (medsr.pacs.protocol.DicomUpscaler): no import of medsr's
    API (medsr / medsr.api) or CLI from any of its modules."""
    import ast

    from conftest import REPO

    for path in sorted((REPO / "medsr" / "pacs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
                names = [a.name for a in node.names]
                assert not (mods[0] == "medsr" and names != ["pacs"]), (path.name, names)
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for m in mods:
                assert m != "medsr" and not m.startswith(("medsr.api", "medsr.cli")), (path.name, m)


@pytest.mark.parametrize(("code", "outcome"), [
    (0x0000, "delivered"), (0x0111, "delivered"), (0xB000, "delivered"), (0xB007, "delivered"),
    (0xA700, "dest_transient"), (0xA7FF, "dest_transient"), (0x0110, "dest_transient"), (0x0213, "dest_transient"),
    (0xA900, "dest_permanent"), (0xC000, "dest_permanent"), (0x0122, "dest_permanent"), (0x0124, "dest_permanent"),
])
def test_failure_table_statuses(code: int, outcome: str) -> None:
    from medsr.pacs.failures import classify_status

    assert classify_status(code).outcome.value == outcome


def test_failure_table_http_and_exceptions() -> None:
    import errno
    import sqlite3

    from medsr.pacs.failures import Outcome, SpoolFault, classify_error, classify_http

    assert classify_http(200).outcome is Outcome.DELIVERED
    for code in (429, 503, 0, 401):
        assert classify_http(code).outcome is Outcome.DEST_TRANSIENT
    assert classify_http(400).outcome is Outcome.DEST_PERMANENT
    up = "upscale"
    assert classify_error(RuntimeError("CUDA error: an illegal memory access"), up).outcome is Outcome.WORKER_BROKEN
    assert classify_error(RuntimeError("std::bad_alloc"), up).outcome is Outcome.WORKER_BROKEN
    assert classify_error(MemoryError(), up).outcome is Outcome.LOCAL_RETRY
    assert classify_error(ValueError("pixel data too short"), up).outcome is Outcome.INPUT_BAD
    assert classify_error(OSError(errno.ENOSPC, "No space left", "/spool/x"), up).outcome is Outcome.SPOOL_ERROR
    assert classify_error(SpoolFault("disk full"), up).outcome is Outcome.SPOOL_ERROR
    assert classify_error(sqlite3.OperationalError("database or disk is full"), up).outcome is Outcome.SPOOL_ERROR
    assert classify_error(TimeoutError(), "forward").outcome is Outcome.DEST_TRANSIENT
