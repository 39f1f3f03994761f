"""Filesystem helpers used by every writer (images, ONNX, engines, checkpoints, downloads).

Atomic writes: a temporary file next to the destination, ``os.replace`` on success. Errors are plain
``OSError``s, so each caller wraps them in its own error type.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


class EmptyWriteError(OSError):
    """The writer returned without writing anything."""


#: below this many free bytes a failed write is reported as a full disk
_LOW_SPACE = 1 << 20


def os_error_reason(e: OSError, folder: str | os.PathLike[str] | None = None) -> str:
    """A short reason for a failed write: the OS message, also when a library dropped the errno
    (numpy's ``tofile`` says "N requested and 0 written"): then a full ``folder`` is named as such."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno is not None:
            return err.strerror or os.strerror(err.errno)
    if folder is not None:
        try:
            if shutil.disk_usage(folder).free < _LOW_SPACE:
                return os.strerror(errno.ENOSPC)
        except OSError:
            pass
    return str(e) or type(e).__name__


def _umask() -> int:
    try:  # Linux: read without changing it (os.umask is process-wide and racy with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s directory (same suffix, so writers that pick the format
    from the suffix work); on success it is flushed to disk and renamed over ``dest`` with
    ``os.replace``; on any exception (KeyboardInterrupt included) it is removed and ``dest`` is left
    as it was. The final file gets the usual permissions (0666 & ~umask), or those of the file it
    replaces.
    """
    dest = Path(dest)
    tmp = _create_temp(dest)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise EmptyWriteError("the writer produced no data")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            mode = dest.stat().st_mode & 0o7777
        except OSError:
            mode = _FILE_MODE
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


#: ``.<name, cut to fit>.medsr-<pid>-<random>.tmp<suffix>``: the pid lets a later run tell its own dead temps
TEMP_RE = re.compile(r"^\..*\.medsr-(\d+)-[0-9a-f]{8}\.tmp[^/]*$")
NAME_MAX = 255


def _ascii(name: str) -> str:
    """``name`` with every character outside printable ASCII replaced by ``_``."""
    return "".join(c if " " <= c <= "~" else "_" for c in name)


def _create_temp(dest: Path) -> Path:
    """A new empty temp file beside ``dest`` whose name is printable ASCII and stays within NAME_MAX
    bytes. ASCII, because the name is handed to C libraries that take UTF-8 (OpenCV's imwrite): a
    destination name that is not valid UTF-8 (Latin-1 bytes from an old share, surrogate-escaped in
    Python) cannot be passed to them, and only ``os.replace`` sees the real name, as bytes."""
    for _ in range(100):
        tail = f".medsr-{os.getpid()}-{secrets.token_hex(4)}.tmp{_ascii(dest.suffix)}"
        room = NAME_MAX - 1 - len(tail)
        stem = _ascii(dest.name)[: max(room, 0)]
        tmp = dest.parent / f".{stem}{tail}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{dest}: cannot create a temporary file beside it")  # pragma: no cover


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files of medsr's naming pattern in ``folder`` whose writing process is gone
    (a run killed by SIGKILL or a power loss). Temps of live processes are left alone."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = TEMP_RE.match(e.name)
        if not m or not e.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(e.path)
            removed.append(Path(e.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
