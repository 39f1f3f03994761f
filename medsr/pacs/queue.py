"""The durable work queue: one SQLite database (WAL) for the state, one file per DICOM payload.

::

    <spool>/queue.db       items: id, key (source SOP Instance UID), state, attempts, last_error, due, lease, ...
    <spool>/payload/       <file>.dcm (received source), <file>.out.dcm (derived instance)
    <spool>/tmp/           instances being received (pynetdicom's chunked receive writes here)
    <spool>/.lock          one node per spool

States::

    received ──claim──► processing ──► outgoing ──(sent)──► delivered
        ▲                   │  │           │  ▲
        └── retry/crash ────┘  │           └──┘ retry (destination transient)
                               ▼           ▼
                              dead ◄───────┘   (input bad, permanent refusal, retries exhausted)
    dead ──``medsr-node requeue``──► received (or outgoing when the derived file exists)

CT/MR instances (``series`` set: their SeriesInstanceUID) are received the same way but claimed only with
their series, as a unit, once it is stable (:meth:`WorkQueue.claim_series`); the derived slices of a series
become new outgoing items in the transaction that records its members as delivered
(:meth:`WorkQueue.series_upscaled`).

A claimed item carries a lease (the id of the node run holding it). At start every lease of an earlier run
is a crash (or a kill): the item goes back with one more attempt, so an instance that kills the process
ends in dead-letter after ``max_attempts`` instead of a crash loop. Items of one key are worked strictly in
arrival order, one at a time (the per-key lock): a re-send never touches the copy being upscaled.

Why SQLite (stdlib, WAL; the commit that acknowledges an instance is fsynced, ``synchronous=FULL``, the
other transitions are crash-safe, ``synchronous=NORMAL``): one transaction moves an item between states together
with its attempts, last error and lease, which a folder-per-state layout cannot do atomically; it is
crash-safe and measured at several hundred durable enqueues + claims per second on the CI VM
(``tests/test_pacs_queue.py`` prints the rate), far above what upscaling sustains.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsr.pacs.failures import SpoolFault

STATES = ("received", "processing", "outgoing", "delivered", "dead")
ACTIVE = ("received", "processing", "outgoing")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    file TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    dead_stage TEXT,
    due REAL NOT NULL,
    failing_since REAL,
    lease TEXT,
    derived_uid TEXT,
    calling_ae TEXT,
    peer TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    series TEXT
);
CREATE INDEX IF NOT EXISTS items_state_due ON items (state, due);
CREATE INDEX IF NOT EXISTS items_key ON items (key, state);
"""
#: created after the ``series`` column exists (a spool of an earlier version gets the column first)
_SERIES_INDEX = "CREATE INDEX IF NOT EXISTS items_series ON items (series, state)"


class SpoolError(RuntimeError):
    """The spool cannot be opened (missing permissions, in use by another node)."""


@dataclass(frozen=True)
class Item:
    id: int
    key: str
    file: str
    state: str
    attempts: int
    crashes: int
    last_error: str | None
    dead_stage: str | None
    due: float
    failing_since: float | None
    lease: str | None
    derived_uid: str | None
    calling_ae: str | None
    peer: str | None
    created: float
    updated: float
    #: CT/MR instance collected into its series (the SeriesInstanceUID): worked as one volume, never alone
    series: str | None = None


_COLS = ", ".join(Item.__dataclass_fields__)


# os.link cannot work here (another file system, links not supported): copy instead
_NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(e: BaseException) -> SpoolFault:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return SpoolFault(f"{type(e).__name__}: {text}")


class WorkQueue:
    """The queue of one spool folder. Thread-safe; every method raises :class:`SpoolFault` on a
    filesystem or database error (the caller retries later; the database stays the truth)."""

    def __init__(self, root: Path, *, lock: bool = True) -> None:
        self.root = Path(root)
        self.payload = self.root / "payload"
        self.tmp = self.root / "tmp"
        self.run_id = uuid.uuid4().hex[:16]
        self._mu = threading.RLock()
        self._lock_file: Any = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.payload.mkdir(exist_ok=True)
            self.tmp.mkdir(exist_ok=True)
            if lock:
                self._lock_file = open(self.root / ".lock", "a+")  # noqa: SIM115 - held for the node's lifetime
        except OSError as e:
            raise SpoolError(f"spool {self.root}: cannot create it ({e.strerror or e})") from None
        if lock:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock_file.close()
                raise SpoolError(f"spool {self.root}: in use by another medsr-node (lock held on .lock)") from None
        try:
            self.db = sqlite3.connect(self.root / "queue.db", timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            # a small write-ahead log, checkpointed often and truncated: it must fit a nearly full disk
            self.db.execute("PRAGMA wal_autocheckpoint=64")
            self.db.execute("PRAGMA journal_size_limit=1048576")
            self.db.executescript(_SCHEMA)
            if "series" not in {r[1] for r in self.db.execute("PRAGMA table_info(items)")}:
                self.db.execute("ALTER TABLE items ADD COLUMN series TEXT")  # a spool of an earlier version
            self.db.execute(_SERIES_INDEX)
            probe = self.tmp / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except (OSError, sqlite3.Error) as e:
            self.close()
            raise SpoolError(f"spool {self.root}: not usable ({_fault(e)})") from None

    def close(self) -> None:
        with self._mu:
            db = getattr(self, "db", None)
            if db is not None:
                try:
                    db.close()
                except sqlite3.Error:  # pragma: no cover
                    pass
                self.db = None  # type: ignore[assignment]
            if self._lock_file is not None:
                try:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                finally:
                    self._lock_file.close()
                    self._lock_file = None

    # plumbing ----------------------------------------------------------------------------------
    def ensure_reserve(self, size: int) -> None:
        """Keep ``size`` bytes of the spool's disk in a reserve file, given up when the database finds the disk
        full, so that forwarding (which frees space) can still record its work."""
        p = self.root / ".reserve"
        try:
            if not p.exists() or p.stat().st_size < size:
                with open(p, "wb") as f:
                    f.write(b"\0" * size)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError:
            p.unlink(missing_ok=True)

    def _tx(self, fn: Callable[[sqlite3.Connection], Any], durable: bool = False) -> Any:
        try:
            return self._tx1(fn, durable)
        except SpoolFault as e:
            reserve = self.root / ".reserve"
            if "full" not in str(e) or not reserve.exists():
                raise
            reserve.unlink(missing_ok=True)  # the disk is full: give up the reserve and try once more
            return self._tx1(fn, durable)

    def _tx1(self, fn: Callable[[sqlite3.Connection], Any], durable: bool = False) -> Any:
        """One transaction. ``durable``: fsynced at commit (power-loss safe: an acknowledged instance);
        otherwise safe against a process crash, and a power loss may undo it (a claim or a delivery record:
        the item is then worked or sent again, with the same UIDs)."""
        with self._mu:
            try:
                if durable:
                    self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self.db)
                    self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:  # a failed COMMIT (disk full) may have rolled back already
                        try:
                            self.db.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
                    raise
                return out
            except (sqlite3.Error, OSError) as e:
                raise _fault(e) from None
            finally:
                if durable:
                    try:
                        self.db.execute("PRAGMA synchronous=NORMAL")
                    except sqlite3.Error:
                        pass

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[Item]:
        with self._mu:
            try:
                return [Item(*r) for r in self.db.execute(f"SELECT {_COLS} FROM items {sql}", tuple(args))]
            except sqlite3.Error as e:
                raise _fault(e) from None

    def source_path(self, item: Item) -> Path:
        return self.payload / f"{item.file}.dcm"

    def derived_path(self, item: Item) -> Path:
        return self.payload / f"{item.file}.out.dcm"

    # receive -----------------------------------------------------------------------------------
    def add(self, key: str, src: Path | bytes, *, calling_ae: str = "", peer: str = "",
            series: str | None = None) -> int:
        """Make a received instance durable (file data + folder entry fsynced, then the row committed) and
        queue it. ``src``: a finished file in ``tmp/`` (hard-linked, else copied) or the encoded bytes.
        ``series``: a CT/MR instance, collected into that series (:meth:`claim_series`)."""
        name = uuid.uuid4().hex
        dst = self.payload / f"{name}.dcm"
        try:
            if isinstance(src, bytes):
                self._write(dst, src)
            else:
                try:
                    os.link(src, dst)
                except OSError as e:
                    if e.errno not in _NO_HARD_LINK:  # read-only, full, ...: that is the error to report
                        raise
                    self._write(dst, Path(src).read_bytes())
                fd = os.open(dst, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(self.payload)
        except OSError as e:
            self._unlink(dst)  # on a read-only spool this fails too: the sweep removes it later
            raise _fault(e) from None
        now = time.time()
        try:
            return int(self._tx(lambda db: db.execute(
                "INSERT INTO items (key, file, state, due, calling_ae, peer, created, updated, series) "
                "VALUES (?, ?, 'received', ?, ?, ?, ?, ?, ?)", (key, name, now, calling_ae, peer, now, now, series),
            ).lastrowid, durable=True))
        except SpoolFault:
            self._unlink(dst)
            raise

    def _write(self, dst: Path, data: bytes) -> None:
        tmp = self.tmp / f"{dst.name}.{threading.get_ident()}.part"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        finally:
            self._unlink(tmp)

    def write_derived(self, item: Item, write: Callable[[Any], None]) -> Path:
        """Write a derived instance durably beside its source (``write(fileobj)``)."""
        dst = self.derived_path(item)
        tmp = self.tmp / f"{dst.name}.{threading.get_ident()}.part"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
            _fsync_dir(self.payload)
        except OSError as e:
            self._unlink(tmp)
            raise _fault(e) from None
        except BaseException:
            self._unlink(tmp)
            raise
        return dst

    # claiming ----------------------------------------------------------------------------------
    def claim(self, state: str) -> Item | None:
        """Lease the oldest due item in ``state`` ("received": it becomes "processing"; "outgoing": it stays
        outgoing, leased) whose key has no earlier unfinished item (the per-key lock)."""
        new_state = "processing" if state == "received" else state
        now = time.time()

        def run(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                "SELECT i.id FROM items i WHERE i.state = ? AND i.lease IS NULL AND i.due <= ? AND i.series IS NULL "
                "AND NOT EXISTS "
                "(SELECT 1 FROM items o WHERE o.key = i.key AND o.id < i.id AND o.state IN "
                "('received', 'processing', 'outgoing')) ORDER BY i.due, i.id LIMIT 1", (state, now),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE items SET state = ?, lease = ?, updated = ? WHERE id = ?",
                       (new_state, self.run_id, now, row[0]))
            return int(row[0])

        got = self._tx(run)
        return None if got is None else self.get(got)

    def claim_series(self, stable_age: float) -> list[Item]:
        """Lease every received member of the oldest series that is *stable*: no instance of it committed for
        ``stable_age`` seconds (from the rows' timestamps: a restart does not reset the quiet time), all of its
        received members due, and no earlier collection of it still being worked. The members become
        "processing" together; [] when no series is ready."""
        now = time.time()

        def run(db: sqlite3.Connection) -> list[int]:
            row = db.execute(
                "SELECT i.series FROM items i WHERE i.series IS NOT NULL AND i.state = 'received' GROUP BY i.series "
                "HAVING MAX(i.created) <= ? AND MAX(i.due) <= ? AND COUNT(i.lease) = 0 AND NOT EXISTS "
                "(SELECT 1 FROM items o WHERE o.series = i.series AND o.state = 'processing') "
                "ORDER BY MAX(i.created) LIMIT 1", (now - stable_age, now),
            ).fetchone()
            if row is None:
                return []
            ids = [r[0] for r in db.execute(
                "SELECT id FROM items WHERE series = ? AND state = 'received' AND lease IS NULL ORDER BY id", (row[0],))]
            db.executemany("UPDATE items SET state = 'processing', lease = ?, updated = ? WHERE id = ?",
                           [(self.run_id, now, i) for i in ids])
            return ids

        return [self.get(i) for i in self._tx(run)]

    def dead_series_members(self, reason: str) -> int:
        """Dead-letter every received member of a series (a node started without the volume path: nothing
        would ever claim them; ``medsr-node requeue`` brings them back once it is on)."""
        now = time.time()
        return int(self._tx(lambda db: db.execute(
            "UPDATE items SET state = 'dead', dead_stage = 'series', last_error = ?, updated = ? "
            "WHERE series IS NOT NULL AND state = 'received'", (reason, now)).rowcount))

    def get(self, item_id: int) -> Item:
        rows = self._rows("WHERE id = ?", (item_id,))
        if not rows:
            raise KeyError(item_id)
        return rows[0]

    # transitions -------------------------------------------------------------------------------
    def upscaled(self, item: Item, derived_uid: str) -> None:
        """processing -> outgoing (the derived file is already on disk)."""
        now = time.time()
        self._tx(lambda db: db.execute(
            "UPDATE items SET state = 'outgoing', lease = NULL, attempts = 0, failing_since = NULL, "
            "last_error = NULL, derived_uid = ?, due = ?, updated = ? WHERE id = ? AND lease = ?",
            (derived_uid, now, now, item.id, self.run_id)))
        self._unlink(self.source_path(item))

    def series_upscaled(self, members: list[Item], files: list[tuple[Path, str]], note: str) -> list[int]:
        """processing -> done for a series: the derived instances ``files`` [(file in the spool, its SOP Instance
        UID)] become outgoing items (moved into ``payload/``, folder fsynced), and in the same transaction the
        members are recorded as delivered with ``note`` (their derived series is queued); their files go.
        Returns the new items' ids. A crash before the commit leaves the members leased (worked again) and
        the moved files unreferenced (swept at the next start)."""
        names = [uuid.uuid4().hex for _ in files]
        try:
            for (src, _), name in zip(files, names, strict=True):
                os.replace(src, self.payload / f"{name}.out.dcm")
            _fsync_dir(self.payload)
        except OSError as e:
            for name in names:
                self._unlink(self.payload / f"{name}.out.dcm")
            raise _fault(e) from None
        now = time.time()
        first = members[0] if members else None

        def run(db: sqlite3.Connection) -> list[int]:
            ids = [int(db.execute(
                "INSERT INTO items (key, file, state, due, derived_uid, calling_ae, peer, created, updated) "
                "VALUES (?, ?, 'outgoing', ?, ?, ?, ?, ?, ?)",
                (uid, name, now, uid, first.calling_ae if first else "", first.peer if first else "", now, now),
            ).lastrowid) for (_, uid), name in zip(files, names, strict=True)]
            db.executemany("UPDATE items SET state = 'delivered', lease = NULL, last_error = ?, updated = ? "
                           "WHERE id = ? AND lease = ?", [(note, now, m.id, self.run_id) for m in members])
            return ids

        try:
            ids = self._tx(run)
        except SpoolFault:
            for name in names:
                self._unlink(self.payload / f"{name}.out.dcm")
            raise
        for m in members:
            self._unlink(self.source_path(m))
        return list(ids)

    def delivered(self, item: Item, note: str | None = None) -> None:
        """outgoing -> delivered; the payload files go."""
        now = time.time()
        self._tx(lambda db: db.execute(
            "UPDATE items SET state = 'delivered', lease = NULL, last_error = ?, updated = ? WHERE id = ?",
            (note, now, item.id)))
        self._unlink(self.derived_path(item))
        self._unlink(self.source_path(item))

    def retry(self, item: Item, error: str, delay: float, *, count: bool = True) -> Item:
        """Back to the queue (processing -> received; outgoing stays outgoing), due in ``delay`` seconds."""
        back = "received" if item.state == "processing" else item.state
        now = time.time()
        self._tx(lambda db: db.execute(
            "UPDATE items SET state = ?, lease = NULL, attempts = attempts + ?, last_error = ?, due = ?, "
            "failing_since = COALESCE(failing_since, ?), updated = ? WHERE id = ?",
            (back, 1 if count else 0, error, now + delay, now, now, item.id)))
        return self.get(item.id)

    def dead(self, item: Item, stage: str, reason: str) -> None:
        now = time.time()
        self._tx(lambda db: db.execute(
            "UPDATE items SET state = 'dead', lease = NULL, dead_stage = ?, last_error = ?, updated = ? WHERE id = ?",
            (stage, reason, now, item.id)))

    def release(self, item: Item) -> None:
        """Give a leased item back without counting an attempt (graceful stop)."""
        back = "received" if item.state == "processing" else item.state
        self._tx(lambda db: db.execute("UPDATE items SET state = ?, lease = NULL WHERE id = ?", (back, item.id)))

    def _unlink(self, p: Path) -> None:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass  # a leftover file of a finished item: removed by the next start's sweep

    # recovery ----------------------------------------------------------------------------------
    def recover(self, max_attempts: int) -> tuple[int, int]:
        """At start: every lease held by an earlier run is a crash: one more attempt, or dead-letter after
        ``max_attempts``; partial files and orphan payloads go. Returns (resumed, dead-lettered)."""
        now = time.time()
        reason = "the node stopped while working on it (crash or kill)"

        def run(db: sqlite3.Connection) -> tuple[int, int]:
            leased = db.execute("SELECT id, state, attempts FROM items WHERE lease IS NOT NULL AND lease != ?",
                                (self.run_id,)).fetchall()
            dead = 0
            for item_id, state, attempts in leased:
                back = "received" if state == "processing" else state
                if attempts + 1 >= max_attempts:
                    db.execute("UPDATE items SET state = 'dead', dead_stage = ?, lease = NULL, attempts = ?, "
                               "crashes = crashes + 1, last_error = ?, updated = ? WHERE id = ?",
                               ("upscale" if state == "processing" else "forward", attempts + 1,
                                f"{reason}, {attempts + 1} time(s): poison instance?", now, item_id))
                    dead += 1
                else:
                    db.execute("UPDATE items SET state = ?, lease = NULL, attempts = attempts + 1, "
                               "crashes = crashes + 1, last_error = ?, updated = ? WHERE id = ?",
                               (back, reason, now, item_id))
            return len(leased) - dead, dead

        out = self._tx(run)
        self.sweep_files()
        return out

    def sweep_files(self, older_than: float = 0.0) -> int:
        """Remove payload files no item refers to, and partial writes in tmp/, older than ``older_than``
        seconds (0: all, at start, before anything is received).

        A received instance's payload file is written (and fsynced) *before* its row is committed, so while
        the node receives, a fresh file without a row is an instance being acknowledged right now, not an
        orphan: the age bound keeps it (this sweep once deleted such a file under load, and the instance,
        already acknowledged, was never delivered). The folder is listed before the database is read, so a
        file listed whose row commits before the read is kept in any case."""
        now = time.time()
        try:
            listed = list(self.payload.iterdir())
            partial = list(self.tmp.iterdir())
        except OSError:
            return 0
        with self._mu:
            try:
                keep = {f for (f,) in self.db.execute("SELECT file FROM items WHERE state IN "
                                                       "('received', 'processing', 'outgoing', 'dead')")}
            except sqlite3.Error:
                return 0

        def old(p: Path) -> bool:
            try:
                return not older_than or now - p.stat().st_mtime > older_than
            except OSError:
                return False  # gone already

        n = 0
        for p in listed:
            if p.name.split(".")[0] not in keep and old(p):
                self._unlink(p)
                n += 1
        for p in partial:
            if old(p):
                try:
                    p.unlink()
                    n += 1
                except OSError:
                    continue
        return n

    def release_orphans(self, held: set[int], delay: float) -> int:
        """Leases of this run that no worker holds any more (its last transition failed on a spool error):
        back to the queue, due in ``delay`` s. Run periodically: nothing waits for a restart."""
        now = time.time()

        def run(db: sqlite3.Connection) -> int:
            rows = [r[0] for r in db.execute("SELECT id FROM items WHERE lease = ?", (self.run_id,))]
            orphans = [i for i in rows if i not in held]
            for i in orphans:
                db.execute("UPDATE items SET state = CASE state WHEN 'processing' THEN 'received' ELSE state END, "
                           "lease = NULL, due = ?, updated = ? WHERE id = ?", (now + delay, now, i))
            return len(orphans)

        return int(self._tx(run))

    # operator ----------------------------------------------------------------------------------
    def requeue(self, ids: Iterable[int] | None = None) -> int:
        """dead -> received (or outgoing when its derived file exists), attempts reset. ``ids`` None: all."""
        want = None if ids is None else set(ids)
        dead = [i for i in self.items("dead") if want is None or i.id in want]
        now = time.time()

        def run(db: sqlite3.Connection) -> int:
            n = 0
            for it in dead:
                if self.derived_path(it).exists():
                    state = "outgoing"
                elif self.source_path(it).exists():
                    state = "received"
                else:
                    continue
                db.execute("UPDATE items SET state = ?, attempts = 0, crashes = 0, failing_since = NULL, due = ?, "
                           "dead_stage = NULL, updated = ? WHERE id = ? AND state = 'dead'", (state, now, now, it.id))
                n += 1
            return n

        return int(self._tx(run))

    def items(self, state: str) -> list[Item]:
        return self._rows("WHERE state = ? ORDER BY id", (state,))

    def counts(self) -> dict[str, int]:
        with self._mu:
            try:
                got = dict(self.db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
            except sqlite3.Error:
                return {}
        return {s: int(got.get(s, 0)) for s in STATES}

    def count(self, state: str) -> int:
        return self.counts().get(state, 0)

    def prune(self, older_than_s: float) -> int:
        """Forget delivered items older than ``older_than_s`` seconds."""
        cut = time.time() - older_than_s
        return int(self._tx(lambda db: db.execute(
            "DELETE FROM items WHERE state = 'delivered' AND updated < ?", (cut,)).rowcount))
