"""Download-and-verify: stream to a temp file in the cache, check sha256, rename atomically."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from medsr.fsutil import sha256_file
from medsr.weights.errors import WeightsError
from medsr.weights.registry import ModelEntry, cache_dir, find_entry

_CHUNK = 1 << 20


def resolve_entry(name_or_entry: str | ModelEntry) -> ModelEntry:
    if isinstance(name_or_entry, ModelEntry):
        return name_or_entry
    entry = find_entry(name_or_entry)
    if entry is None:
        from medsr.weights.registry import MODELS

        raise WeightsError(f"unknown model {name_or_entry!r}; registered: {', '.join(sorted(MODELS))}")
    return entry


def verify(path: Path, entry: ModelEntry, digest: str | None = None) -> str:
    """Check ``path`` against the pinned hash; return ``"ok"`` or ``"not pinned"``, raise on mismatch."""
    digest = digest or sha256_file(path)
    if entry.sha256 is None:
        return "not pinned"
    if digest != entry.sha256:
        raise WeightsError(
            f"{path}: sha256 mismatch for {entry.name!r}: expected {entry.sha256}, got {digest}. "
            + ("The file ships with medsr and was modified: reinstall medsr." if entry.packaged
               else f"Delete the file and download it again from {entry.url}")
        )
    return "ok"


def download(
    name_or_entry: str | ModelEntry, dest_dir: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> Path:
    """Fetch the weights of a registered model into ``dest_dir`` (default: the cache) and verify sha256.

    A file already there with the right hash is a cache hit (nothing is fetched). The download goes to a
    temp file in the same directory and is renamed into place only after the hash matched.
    """
    entry = resolve_entry(name_or_entry)
    folder = Path(dest_dir) if dest_dir is not None else cache_dir()
    dest = folder / entry.filename
    if dest.is_file():
        digest = sha256_file(dest)
        if entry.sha256 is None or digest == entry.sha256:
            return dest
        print(f"medsr: {dest} has sha256 {digest}, expected {entry.sha256}; downloading again", file=sys.stderr)
    from medsr.fsutil import atomic_write_path

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(dest) as tmp:  # renamed into place only after the hash matched
        with tmp.open("wb") as out:
            digest = _fetch(entry.url, out, progress=progress)
        status = verify(tmp, entry, digest)
        if status == "not pinned":
            print(f"medsr: sha256 of {entry.name} is not pinned; downloaded file has {digest}", file=sys.stderr)
    return dest


def _fetch(url: str, out, *, progress: bool) -> str:  # noqa: ANN001 - binary file object
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - https/file URLs from the registry
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = _progress_bar(url, total) if progress else None
            try:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(f"download of {url} failed: {e}") from e
    return h.hexdigest()


def _progress_bar(url: str, total: int | None):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], file=sys.stderr)
