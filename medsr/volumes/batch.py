"""Volume jobs in a batch: which inputs are volumes, where their outputs go, and running them.

``medsr-infer`` asks :func:`split_inputs` first, so that a CT series folder is one volume job, never 300
unrelated 2D images; what is left goes to the 2D walk (:func:`medsr.batch.collect_jobs`) with the volume
folders and files excluded. Output rules are the 2D ones: never over an input, atomic, existing outputs skipped
unless ``overwrite``, a failed volume reported and the batch goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medsr.volumes.io import probe_volume
from medsr.volumes.nifti import volume_file_kind


@dataclass
class VolumeJob:
    src: Path  # a NIfTI/MGZ/enhanced file, or the folder that directly holds the series' files
    dst: Path
    description: str
    files: list[Path] | None = None  # a classic DICOM series: its files
    series_uid: str | None = None


@dataclass
class VolumeWalk:
    jobs: list[VolumeJob] = field(default_factory=list)
    #: resolved volume files (NIfTI/MGZ, enhanced, the series' slices), for the 2D walk to leave out
    exclude: set[Path] = field(default_factory=set)


def output_name(src: Path, kind: str) -> str:
    """A NIfTI/MGZ input keeps its name (an .mgz becomes .nii.gz); an enhanced multi-frame file becomes a
    derived series folder named after its stem."""
    if kind == "mgz":
        return src.name[: -len(src.suffix)] + ".nii.gz"
    if kind == "dicom-enhanced":
        return src.stem or src.name
    return src.name


def _series_in(folder: Path, names: list[str]) -> dict[str, tuple[str, list[Path]]]:
    """{SeriesInstanceUID: (modality, files)} of the CT/MR image series with >= MIN_SLICES single-frame files
    directly in ``folder`` (headers only)."""
    from medsr.volumes.dicom_series import is_ct_mr_image, read_header
    from medsr.volumes.io import MIN_SLICES

    found: dict[str, tuple[str, list[Path]]] = {}
    for name in names:
        f = folder / name
        if name.startswith(".") or not f.is_file() or volume_file_kind(f) is not None:
            continue
        ds = read_header(f, ["SOPClassUID", "Modality", "SeriesInstanceUID", "NumberOfFrames", "Rows"])
        if ds is None or not is_ct_mr_image(ds) or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        found.setdefault(uid, (str(ds.get("Modality", "") or ""), []))[1].append(f)
    return {u: v for u, v in found.items() if len(v[1]) >= MIN_SLICES}


def split_inputs(inputs: list[Path], outdir: Path) -> VolumeWalk:
    """The volumes among ``inputs``: NIfTI/MGZ files, enhanced multi-frame CT/MR files, and CT/MR series whose
    slices lie directly in one folder (given or met while walking; hidden entries and the output folder are not
    walked). A series becomes the output folder named like its input folder (``<folder>/<SeriesInstanceUID>``
    when one folder holds several series); other files stay 2D."""
    vw = VolumeWalk()
    multi = len(inputs) > 1
    out_res = outdir.resolve() if outdir.exists() else None

    def add_file(f: Path, dst_dir: Path) -> None:
        if volume_file_kind(f) is None and not _maybe_enhanced(f):
            return
        pr = probe_volume(f)
        if pr is not None:
            vw.jobs.append(VolumeJob(f, dst_dir / output_name(f, pr.kind), pr.description))
            vw.exclude.add(f.resolve())

    for inp in inputs:
        if not inp.is_dir():
            add_file(inp, outdir)
            continue
        base = outdir / inp.name if multi else outdir
        for root, dirs, files in os.walk(inp, followlinks=True):
            rootp = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and (out_res is None or (rootp / d).resolve() != out_res))
            rel = rootp.relative_to(inp)
            series = _series_in(rootp, sorted(files))
            for uid, (modality, sfiles) in series.items():
                dst = base / rel if rel != Path(".") else base / inp.name
                if len(series) > 1:
                    dst = dst / uid
                desc = f"{modality} DICOM series {uid}: {len(sfiles)} images"
                vw.jobs.append(VolumeJob(rootp, dst, desc, sfiles, uid))
                vw.exclude.update(f.resolve() for f in sfiles)
            for name in sorted(files):
                f = rootp / name
                if not name.startswith(".") and f.resolve() not in vw.exclude:
                    add_file(f, base / rel)
    return vw


def _maybe_enhanced(path: Path) -> bool:
    return path.is_file() and volume_file_kind(path) is None and path.suffix.lower() in ("", ".dcm", ".dicom")


def run_volume_jobs(
    jobs: list[VolumeJob],
    load: Callable[[], object],
    *,
    overwrite: bool = False,
    factor: float | None = None,
    spacing: float | None = None,
    axis: int | None = None,
    dicom_syntax: str | None = None,
    log: Callable[[str], object] = print,
    progress: Callable[[str], Callable[[int, int], object] | None] | None = None,
) -> tuple[int, int, list[tuple[Path, str]]]:
    """Run ``jobs`` with the VolumeUpscaler that ``load()`` returns (loaded only if a job needs it).
    Returns (written, skipped, failed [(src, message)])."""
    written, skipped = 0, 0
    failed: list[tuple[Path, str]] = []
    todo: list[VolumeJob] = []
    for j in jobs:
        if j.dst.exists() and j.dst.resolve() == j.src.resolve():
            failed.append((j.src, f"output {j.dst} would overwrite an input; choose another -o"))
        elif j.dst.exists() and not overwrite:
            skipped += 1
        else:
            todo.append(j)
    if not todo:
        return written, skipped, failed
    vu = load()
    for j in todo:
        log(f"volume: {j.src}: {j.description} -> {j.dst}")
        try:
            vu.upscale_file(j.files or j.src, j.dst, series_uid=j.series_uid, overwrite=overwrite, axis=axis, factor=factor,  # type: ignore[attr-defined]
                            spacing=spacing, log=log, dicom_syntax=dicom_syntax,
                            progress=progress(str(j.src)) if progress else None)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one line per failed volume; the batch goes on
            msg = str(e) or type(e).__name__
            failed.append((j.src, msg if str(j.src) in msg else f"{j.src}: {msg}"))  # reported with the summary
            continue
        written += 1
    return written, skipped, failed
