"""Overlapped batch pipeline: decoding, upscaling and encoding of different images at the same time.

``run_pipeline(up, jobs)`` reads images in reader threads, upscales them one at a time on the calling thread
(one engine, one device queue), and hands the output pixels to encoder *processes*, which build the output
(DICOM derivation and its JPEG 2000 / RLE encoding included) and write it atomically: PNG / JPEG 2000 encoding
holds the GIL in places and costs seconds per 4096x4096 16-bit image, so it runs beside the engine, not in
turn with it. Queues are bounded (``readers + depth`` images read ahead, ``encoders + depth`` outputs waiting
to be written), so memory stays bounded; results come back in input order, under the same output rules as
``Upscaler.upscale_file`` (never over the input, existing outputs skipped unless ``overwrite``, atomic
writes, the pixel limit read from the header).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from medsr.api import Upscaler
    from medsr.io import Image

WRITTEN, SKIPPED, FAILED = "written", "skipped", "failed"


@dataclass(frozen=True)
class PipelineOptions:
    """``readers``: decoding threads; ``encoders``: encoding processes (0: one encoding thread in this process);
    ``depth``: extra images queued between stages beyond the workers (bounds memory)."""

    readers: int = 1
    encoders: int = 2
    depth: int = 1

    def __post_init__(self) -> None:
        if self.readers < 1 or self.encoders < 0 or self.depth < 0:
            raise ValueError(f"readers >= 1, encoders >= 0, depth >= 0; got {self}")


@dataclass
class Outcome:
    src: Path
    dst: Path
    status: str  # WRITTEN | SKIPPED | FAILED
    message: str = ""
    lr_pixels: int = 0


def default_encoders() -> int:
    """One encoder process per CPU beyond the one the engine's thread needs, at least 1."""
    return max(1, (os.cpu_count() or 2) - 1)


def _read(src: Path, dst: Path, overwrite: bool, max_pixels: int | None) -> Image:
    from medsr.api import check_output
    from medsr.io import read_image

    check_output(src, dst, overwrite=overwrite)  # FileExistsError: skipped; ValueError: dst is src
    return read_image(src, max_pixels=max_pixels)


def _encode(src: Image, pixels: np.ndarray | None, done: Image | None, dst: str, scale: int, model_id: str,
            weights_sha256: str | None, dicom_syntax: str | None, provenance: dict[str, str] | None = None) -> None:
    """In an encoder process: the output image (DICOM derived and encoded) from the upscaled pixels, written
    atomically. ``done``: an output built already (multi-frame DICOM)."""
    from medsr.io import make_output, write_image

    out = done if done is not None else make_output(src, pixels, scale, model_id, weights_sha256=weights_sha256,
                                                    dicom_syntax=dicom_syntax, provenance=provenance)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_image(out, dst)


def _message(src: Path, e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    return msg if src.name in msg else f"{src}: {msg}"


def _outcome(src: Path, dst: Path, e: BaseException) -> Outcome:
    if isinstance(e, FileExistsError):
        return Outcome(src, dst, SKIPPED, str(e))
    return Outcome(src, dst, FAILED, _message(src, e))


def _encoder_pool(n: int) -> Executor:
    if n == 0:
        return ThreadPoolExecutor(1, thread_name_prefix="medsr-encode")
    # spawn, not fork: the engine's threads (OpenMP, OpenVINO, CUDA) must not be forked mid-flight
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))


def run_pipeline(
    up: Upscaler,
    jobs: Iterable[tuple[Path, Path]],
    *,
    overwrite: bool = False,
    max_pixels: int | None = None,
    dicom_syntax: str | None = None,
    options: PipelineOptions | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> Iterator[Outcome]:
    """Upscale ``jobs`` ((src, dst) pairs) with reading, upscaling and encoding overlapped; yields one
    :class:`Outcome` per job, in input order. ``progress(done, total)`` reports tiles of the image on the
    engine. Interrupting the iteration (Ctrl-C, ``close()``) cancels queued work; files being written are
    abandoned by the atomic writer (no partial outputs)."""
    from medsr.io import DEFAULT_MAX_PIXELS

    opt = options or PipelineOptions()
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    pending = iter([(Path(s), Path(d)) for s, d in jobs])
    readers = ThreadPoolExecutor(opt.readers, thread_name_prefix="medsr-read")
    encoders = _encoder_pool(opt.encoders)
    reads: deque[tuple[Path, Path, Future[Image]]] = deque()
    writes: deque[tuple[Path, Path, int, Future[None] | Outcome]] = deque()
    max_writes = max(1, opt.encoders) + opt.depth
    try:
        while True:
            while len(reads) < opt.readers + opt.depth:  # read ahead, bounded
                nxt = next(pending, None)
                if nxt is None:
                    break
                reads.append((*nxt, readers.submit(_read, nxt[0], nxt[1], overwrite, limit)))
            if not reads:
                break
            src, dst, fut = reads.popleft()
            try:
                img = fut.result()
                if img.frames > 1:  # multi-frame DICOM: frames derived on the engine side, written by an encoder
                    args = (img, None, up.upscale_image(img, progress=progress, dicom_syntax=dicom_syntax))
                else:
                    args = (img, up.upscale_stored(img, progress=progress), None)
                lr = img.height * img.width * img.frames
                writes.append((src, dst, lr, encoders.submit(_encode, *args, str(dst), up.scale, up.model_id,
                                                             up.weights_sha256, dicom_syntax, up.provenance())))
            except Exception as e:  # unreadable, too large, exists, engine failure: this file only
                writes.append((src, dst, 0, _outcome(src, dst, e)))
            # hand back finished work in order; block on the oldest when too many outputs wait
            while writes and (len(writes) > max_writes or _done(writes[0][3])):
                yield _finish(writes.popleft())
        while writes:
            yield _finish(writes.popleft())
    finally:
        for *_, f in reads:
            f.cancel()
        for *_, w in writes:
            if isinstance(w, Future):
                w.cancel()
        readers.shutdown(wait=True, cancel_futures=True)
        encoders.shutdown(wait=True, cancel_futures=True)


def _done(w: Future[None] | Outcome) -> bool:
    return not isinstance(w, Future) or w.done()


def _finish(item: tuple[Path, Path, int, Future[None] | Outcome]) -> Outcome:
    src, dst, lr, w = item
    if isinstance(w, Outcome):
        return w
    try:
        w.result()
    except Exception as e:
        return _outcome(src, dst, e)
    return Outcome(src, dst, WRITTEN, lr_pixels=lr)


def pipeline_summary_fields(outcomes: Iterable[Outcome]) -> dict[str, Any]:
    """written / skipped / failed counts and LR megapixels of a finished run."""
    out = list(outcomes)
    return {"written": sum(o.status == WRITTEN for o in out), "skipped": sum(o.status == SKIPPED for o in out),
            "failed": [(o.src, o.message) for o in out if o.status == FAILED],
            "megapixels": sum(o.lr_pixels for o in out) / 1e6}
