"""Batch jobs over files and folders: walking the inputs, output names, collisions and the run's summary.

Library code shared by ``medsr-infer`` (local and ``--ray``), :mod:`medsr.scale.ray_batch` and anything else
that turns a list of inputs into a list of (source, destination) jobs. No click, no printing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    src: Path
    dst: Path


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    megapixels: float = 0.0


def _looks_like_image(path: Path) -> bool:
    """A supported suffix (or none), or DICOM by content (UID-named files like 1.2.840.113619.4)."""
    from medsr.io import is_supported

    if is_supported(path):
        return True
    try:
        with path.open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return True  # let the reader report the problem


@dataclass
class Walk:
    jobs: list[Job] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (path, why): not images, special files
    failed: list[tuple[Path, str]] = field(default_factory=list)  # dangling links, output collisions


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def collect_jobs(inputs: list[Path], outdir: Path, exclude: set[Path] | frozenset[Path] = frozenset()) -> Walk:
    """Files as given; folders walked recursively (hidden files skipped), structure mirrored.

    - Symbolic links are followed (files and folders); a folder reached twice (a link loop or two
      links to one folder) is walked once; a dangling link is reported as failed.
    - The output folder is never walked, even when it lies inside an input folder.
    - Files met while walking that are not images (a manifest.csv) or not regular files (a FIFO)
      are ignored and reported; files named explicitly are always tried.
    - Outputs keep the input's name, except that the suffix follows the content (:func:`output_name`:
      a DICOM file named ``looks_like.png`` gives ``looks_like.dcm``).
    - Two inputs that map to one output (``d1/a.png d2/a.png``, ``a.png`` + ``a.PNG`` on a
      case-insensitive disk) are both reported as failed before anything runs: nothing is dropped.
    - ``exclude``: resolved paths of files and folders handled elsewhere (volumes: medsr.volumes.batch).
    """
    w = Walk()
    multi = len(inputs) > 1
    for inp in inputs:
        if exclude and inp.resolve() in exclude:
            continue
        if not inp.is_dir():
            w.jobs.append(Job(inp, output_name(inp, outdir / inp.name)))
            continue
        if _inside(inp, outdir):
            w.ignored.append((inp, "is inside the output folder"))
            continue
        seen: set[tuple[int, int]] = set()
        for root, dirs, files in os.walk(inp, followlinks=True):
            rootp = Path(root)
            st = rootp.stat()
            if (st.st_dev, st.st_ino) in seen:
                w.ignored.append((rootp, "folder already walked (symbolic link loop or duplicate link)"))
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _same_or_inside(rootp / d, outdir)
                             and not (exclude and (rootp / d).resolve() in exclude))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                f = rootp / name
                if exclude and f.resolve() in exclude:
                    continue
                rel = f.relative_to(inp)
                if f.is_symlink() and not f.exists():
                    w.failed.append((f, f"{f}: dangling symbolic link (target {os.readlink(f)} does not exist)"))
                    continue
                if not f.is_file():
                    w.ignored.append((f, "not a regular file"))
                    continue
                if not _looks_like_image(f):
                    w.ignored.append((f, "not an image"))
                    continue
                w.jobs.append(Job(f, output_name(f, outdir / inp.name / rel if multi else outdir / rel)))
            for d in list(dirs):  # dangling links to folders show up in neither list as files
                if (rootp / d).is_symlink() and not (rootp / d).exists():
                    dirs.remove(d)
                    w.failed.append((rootp / d, f"{rootp / d}: dangling symbolic link"))
    _drop_collisions(w)
    return w


def _same_or_inside(path: Path, folder: Path) -> bool:
    return folder.exists() and _inside(path, folder)


def _drop_collisions(w: Walk) -> None:
    by_dst: dict[str, list[Job]] = {}
    for j in w.jobs:
        by_dst.setdefault(os.path.normcase(str(j.dst.absolute())).casefold(), []).append(j)
    clash = {id(j) for group in by_dst.values() if len(group) > 1 for j in group}
    for group in by_dst.values():
        if len(group) > 1:
            names = ", ".join(str(j.src) for j in group)
            for j in group:
                w.failed.append((j.src, f"{j.src}: output collision: {names} would all be written to {group[0].dst}; "
                                         "give them separate runs or output folders"))
    w.jobs = [j for j in w.jobs if id(j) not in clash]


def output_name(src: Path, dst: Path) -> Path:
    """``dst``, with the suffix of the format ``src`` holds when its name says another one: a DICOM file named
    ``x.png`` (DICOM is recognised by content) is written as ``x.dcm``, a PNG named ``x.jpg`` as ``x.png``.
    UID-named DICOM files (``1.2.840.113619.2.55.3``) keep their names."""
    from medsr.io.base import DEFAULT_SUFFIX, DICOM_SUFFIXES, RASTER_SUFFIXES
    from medsr.io.image import sniff_format

    if not src.is_file():  # never open a FIFO or a device here (it would block): the reader refuses it by name
        return dst
    try:
        with src.open("rb") as f:
            fmt = sniff_format(f.read(132))
    except OSError:
        return dst  # the reader reports the problem
    suffix = dst.suffix.lower()
    if fmt is None or RASTER_SUFFIXES.get(suffix) == fmt:
        return dst
    if fmt == "dicom":
        return dst if suffix in DICOM_SUFFIXES or suffix not in RASTER_SUFFIXES else dst.with_suffix(DEFAULT_SUFFIX[fmt])
    return dst.with_suffix(DEFAULT_SUFFIX[fmt]) if suffix in RASTER_SUFFIXES or suffix in DICOM_SUFFIXES else dst


@dataclass
class Existing:
    """Existing outputs sorted before the model loads: ``skip`` (made by this very job: same source file,
    runtime and precision), ``refuse`` ((src, message): made otherwise, or not by medsr)."""

    run: list[Job] = field(default_factory=list)
    skip: list[Job] = field(default_factory=list)
    refuse: list[tuple[Path, str]] = field(default_factory=list)


def sort_existing(jobs: list[Job], job: dict[str, str | None], *, overwrite: bool,
                  inputs: set[Path] | frozenset[Path] = frozenset()) -> Existing:
    """Which jobs run, which are skipped (their output exists with this job's provenance), and which are refused
    (an output exists that another model or setting made): decided from file headers, before any model loads.
    Outputs that are one of ``inputs`` (resolved) stay in ``run``: the run refuses them with its own message."""
    from medsr.io.provenance import read_provenance, same_job

    out = Existing()
    for j in jobs:
        if overwrite or not j.dst.exists() or j.dst.resolve() in inputs:
            out.run.append(j)
            continue
        prov = read_provenance(j.dst)
        if same_job(prov, job):
            out.skip.append(j)
        else:
            made = f"by {_describe(prov)}" if prov else "without medsr provenance (another tool, or an older medsr)"
            out.refuse.append((j.src, f"{j.dst}: exists, made {made}, not by this job ({_describe(job)}); "
                                      "pass --overwrite to replace it, or choose another -o"))
    return out


def _describe(prov: dict[str, str] | dict[str, str | None]) -> str:
    sha = prov.get("source-sha256")
    parts = [f"model {prov['model']}" if prov.get("model") else "", f"file sha256 {sha[:12]}..." if sha else "",
             " ".join(v for v in (prov.get("runtime"), prov.get("precision")) if v)]
    return ", ".join(p for p in parts if p)


def start_run(walk: Walk, input_files: set[Path], skipped: int = 0) -> tuple[Summary, list[Job], list[Path]]:
    """Before the first file (local or Ray): the run's Summary (``walk.failed`` and ``skipped`` counted), the jobs
    that run (an output that would overwrite an input fails instead), and the temporary files of runs killed
    mid-write that were removed from the output folders."""
    from medsr.fsutil import remove_stale_temps

    summary = Summary(skipped=skipped, failed=list(walk.failed))
    jobs = []
    for job in walk.jobs:
        if job.dst.resolve() in input_files:
            summary.failed.append((job.src, f"output {job.dst} would overwrite an input; choose another -o"))
        else:
            jobs.append(job)
    stale = [p for folder in sorted({j.dst.parent for j in jobs}) for p in remove_stale_temps(folder)]
    return summary, jobs, stale


def summary_lines(s: Summary, ignored: list[tuple[Path, str]], seconds: float, outdir: Path,
                  prog: str = "medsr-infer", ran: str = "", unit: str = "") -> list[str]:
    """The end of a run, one line each: ignored files, the counts (and what ran), then one line per failure.
    ``unit`` "volumes": a volume-only run (no LR megapixel count)."""
    lines = [f"  ignored ({why}): {path}" for path, why in ignored]
    work = "volumes" if unit == "volumes" else f"{s.megapixels:.2f} LR megapixels"
    lines.append(f"{prog}: {s.written} written, {s.skipped} skipped (same job already written), {len(s.failed)} failed, "
                 f"{len(ignored)} ignored (not images or not regular files); "
                 f"{work} in {seconds:.1f} s -> {outdir}" + (f"; ran {ran}" if ran else ""))
    lines += [f"  failed: {msg}" for _src, msg in s.failed]
    return lines
