"""The durable spool: every instance lives in exactly one folder, moved by atomic renames.

::

    tmp/        partial writes (removed at start)
    incoming/   received sources, fsynced before the C-STORE success is sent
    claimed/    sources a worker is upscaling (moved back to incoming/ at start)
    outgoing/   derived instances waiting to be forwarded
    dead/       what failed for good: <key>.dcm + <key>.reason.json

Files are named by the source SOP Instance UID (the key). A re-sent source replaces its incoming
file; its derived UIDs are the same (deterministic), so the destination sees the same instance.
One node owns a spool at a time (an exclusive lock on ``.lock``).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from medsr.pacs.config import is_uid

DIRS = ("tmp", "incoming", "claimed", "outgoing", "dead")


class SpoolError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in DIRS:
                (self.root / d).mkdir(exist_ok=True)
            self._lock = open(self.root / ".lock", "a+")  # noqa: SIM115 - held for the node's lifetime
        except OSError as e:
            raise SpoolError(f"spool {self.root}: cannot create it ({e.strerror or e})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise SpoolError(f"spool {self.root}: in use by another medsr-node (lock held on .lock)") from None
        probe = self.root / "tmp" / f".probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SpoolError(f"spool {self.root}: not writable ({e.strerror or e})") from None
        self._seq = itertools.count()

    def close(self) -> None:
        try:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        finally:
            self._lock.close()

    # naming ------------------------------------------------------------------------------------
    @staticmethod
    def key_for(sop_instance_uid: str) -> str:
        """The file key: the UID itself when it is a valid UID, else a hash (never a path)."""
        uid = sop_instance_uid.strip().rstrip("\x00")
        if is_uid(uid):
            return uid
        return "h" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]

    def path(self, folder: str, key: str) -> Path:
        return self.root / folder / f"{key}.dcm"

    # writing -----------------------------------------------------------------------------------
    def _durable_write(self, dst: Path, write: Any) -> Path:
        tmp = self.root / "tmp" / f"{dst.name}.{os.getpid()}.{next(self._seq)}"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
            _fsync_dir(dst.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dst

    def put_incoming(self, key: str, data: bytes) -> Path:
        """Write a received instance durably (data + directory entry on disk) into incoming/."""
        return self._durable_write(self.path("incoming", key), lambda f: f.write(data))

    def put_outgoing(self, key: str, ds: Any) -> Path:
        """Write a derived dataset durably into outgoing/."""
        return self._durable_write(self.path("outgoing", key), lambda f: ds.save_as(f, enforce_file_format=True))

    # moving ------------------------------------------------------------------------------------
    def claim(self, key: str) -> Path | None:
        """incoming/ -> claimed/ (atomic); None when another worker took it or it is gone."""
        src, dst = self.path("incoming", key), self.path("claimed", key)
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return None
        return dst

    def unclaim(self, key: str) -> None:
        """claimed/ -> incoming/, unless a newer copy arrived meanwhile (then the claimed one goes)."""
        src, dst = self.path("claimed", key), self.path("incoming", key)
        if dst.exists():
            src.unlink(missing_ok=True)
        else:
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                return
        _fsync_dir(dst.parent)

    def remove(self, folder: str, key: str, inode: int | None = None) -> bool:
        """Delete a spooled file; with ``inode``, only if the file is still that one (not replaced)."""
        p = self.path(folder, key)
        try:
            if inode is not None and p.stat().st_ino != inode:
                return False
            p.unlink()
        except FileNotFoundError:
            return inode is None
        _fsync_dir(p.parent)
        return True

    def dead_letter(self, folder: str, key: str, stage: str, reason: str, attempts: int) -> Path | None:
        """Move a spooled file to dead/ with a JSON reason beside it."""
        src = self.path(folder, key)
        dst = self.path("dead", key)
        info = {
            "sop_instance_uid": key,
            "stage": stage,
            "reason": reason,
            "attempts": attempts,
            "file": "derived instance" if folder == "outgoing" else "received source",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        text = (json.dumps(info, indent=2) + "\n").encode()
        self._durable_write(self.root / "dead" / f"{key}.reason.json", lambda f: f.write(text))
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return None
        _fsync_dir(dst.parent)
        return dst

    # recovery ----------------------------------------------------------------------------------
    def recover(self) -> tuple[list[str], list[str]]:
        """At start: drop partial writes, put claimed sources back; returns (incoming, outgoing) keys
        in arrival order."""
        for p in (self.root / "tmp").iterdir():
            p.unlink(missing_ok=True)
        for p in sorted((self.root / "claimed").glob("*.dcm")):
            self.unclaim(p.stem)
        return self.keys("incoming"), self.keys("outgoing")

    def keys(self, folder: str) -> list[str]:
        entries = []
        for p in (self.root / folder).glob("*.dcm"):
            try:
                entries.append((p.stat().st_mtime_ns, p.stem))
            except FileNotFoundError:
                continue
        return [k for _, k in sorted(entries)]

    def count(self, folder: str) -> int:
        with os.scandir(self.root / folder) as it:
            return sum(1 for e in it if e.name.endswith(".dcm"))
