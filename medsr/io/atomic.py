"""Atomic file writes: a temporary file next to the destination, ``os.replace`` on success."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medsr.io.image import ImageWriteError


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
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise ImageWriteError("the writer produced no data")
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
