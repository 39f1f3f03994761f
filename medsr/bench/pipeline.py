"""End-to-end throughput of the overlapped pipeline against its parts, on a batch of radiographs.

``python -m medsr.bench.pipeline --model tiny --count 16 --size 256 --workers 1,2`` (or ``--inputs DIR`` of
real radiographs, centre crops of ``--size``) measures, on the same images in one process:

- **engine**: upscaling alone (images decoded beforehand, outputs kept in memory), images/s;
- **encoders(k)**: building + writing the outputs alone with k encoder processes;
- **sequential**: read -> upscale -> write one image after another (medsr-infer without --encoders);
- **pipeline(k)**: :func:`medsr.pipeline.run_pipeline` with k encoder processes;

and reports pipeline(k) / max(engine, encoders(k)): 1.0 is perfect overlap (the slower stage sets the pace);
and, since on a CPU-only machine the stages share the cores, also pipeline(k) / max(slower stage, CPU bound),
where the CPU bound is the CPU seconds of reading, the engine and the encoders summed and spread over all
cores: no schedule can beat it.
Output: JSON (``--out``) and a markdown table on stdout. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def _write_dicom(path: Path, a: Any, i: int) -> None:
    """A minimal CR instance (12-bit MONOCHROME2, explicit little endian) holding ``a``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    cr = "1.2.840.10008.5.1.4.1.1.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = cr
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bench", str(i)])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["bench-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bench-series"])
    ds.Modality = "CR"
    ds.PixelSpacing = [0.2, 0.2]
    ds.set_pixel_data((a >> 4).astype("uint16"), "MONOCHROME2", 12, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def make_inputs(folder: Path, count: int, size: int, source: Path | None, dicom: bool = False) -> list[Path]:
    """``count`` 16-bit PNGs of ``size`` x ``size``: centre-ish crops of the radiographs in ``source`` (round
    robin, shifted per pass), else synthetic radiographs. ``dicom``: 12-bit CR DICOM files instead (outputs
    are then derived DICOM, JPEG 2000 lossless: the costly encoder)."""
    import cv2
    import numpy as np

    from medsr.bench.measure import synthetic_radiograph

    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".png") if source else []
    out = []
    for i in range(count):
        if files:
            a = cv2.imread(str(files[i % len(files)]), cv2.IMREAD_UNCHANGED)
            a = a.astype(np.uint16) * (257 if a.dtype == np.uint8 else 1)
            if a.ndim == 3:
                a = a[..., 0]
            off = (i // len(files)) * 37
            y0 = max(0, min(a.shape[0] - size, (a.shape[0] - size) // 2 + off))
            x0 = max(0, min(a.shape[1] - size, (a.shape[1] - size) // 2 - off))
            a = a[y0:y0 + size, x0:x0 + size]
        else:
            a = np.rint(synthetic_radiograph(size, size, seed=i) * 65535).astype(np.uint16)
        p = folder / f"in{i:03d}.{'dcm' if dicom else 'png'}"
        if dicom:
            _write_dicom(p, a, i)
        else:
            cv2.imwrite(str(p), a)
        out.append(p)
    return out


def _encode_one(args: tuple[Any, ...]) -> float:
    """Encode one output (in an encoder process); its CPU seconds."""
    from medsr.pipeline import _encode

    c = time.process_time()
    _encode(*args)
    return time.process_time() - c


def measure(up: Any, inputs: list[Path], workers: list[int], work: Path, repeats: int = 1) -> dict[str, Any]:
    from medsr.io import read_image
    from medsr.pipeline import PipelineOptions, run_pipeline

    n = len(inputs)
    c = time.process_time()
    imgs = [read_image(p) for p in inputs]
    read_cpu = time.process_time() - c
    up.upscale_stored(imgs[0])  # warm-up (compilation, first allocations)
    c, t = time.process_time(), time.perf_counter()
    outs = [up.upscale_stored(im) for im in imgs]
    engine_s, engine_cpu = time.perf_counter() - t, time.process_time() - c  # CPU: all the engine's threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    res: dict[str, Any] = {"images": n, "lr_hw": [imgs[0].height, imgs[0].width], "ran": up.describe(),
                           "engine_s": engine_s, "engine_img_s": n / engine_s, "engine_cpu_s": engine_cpu, "read_cpu_s": read_cpu,
                           "cores": cores, "rows": []}
    t = time.perf_counter()
    for p in inputs:
        up.upscale_file(p, work / "seq" / p.name, overwrite=True)
    res["sequential_s"] = time.perf_counter() - t
    import multiprocessing

    for k in workers:
        enc_dir = work / f"enc{k}"
        args = [(im, o, None, str(enc_dir / p.name), up.scale, up.model_id, up.weights_sha256, None)
                for im, o, p in zip(imgs, outs, inputs, strict=True)]
        with ProcessPoolExecutor(k, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_encode_one, args[:k]))  # start the processes (spawn + imports) before timing
            t = time.perf_counter()
            enc_cpu = sum(pool.map(_encode_one, args))
            enc_s = time.perf_counter() - t
        best = float("inf")
        for _ in range(repeats):
            dst = work / f"pipe{k}"
            t = time.perf_counter()
            got = list(run_pipeline(up, [(p, dst / p.name) for p in inputs], overwrite=True,
                                    options=PipelineOptions(encoders=k)))
            best = min(best, time.perf_counter() - t)
            assert all(o.status == "written" for o in got), [o.message for o in got if o.status != "written"]
        slower = max(engine_s, enc_s)
        # on a CPU-only machine both stages draw on the same cores: no schedule beats their summed CPU time
        # spread over all cores, whatever the overlap
        cpu_bound = (read_cpu + engine_cpu + enc_cpu) / cores
        res["rows"].append({"encoders": k, "encoders_s": enc_s, "encoders_cpu_s": enc_cpu, "pipeline_s": best,
                            "pipeline_img_s": n / best, "ratio_to_slower_stage": best / slower,
                            "cpu_bound_s": cpu_bound, "ratio_to_bound": best / max(slower, cpu_bound),
                            "bound": ("cores" if cpu_bound > slower else "engine" if engine_s >= enc_s else "encoders")})
    return res


def markdown(res: dict[str, Any]) -> str:
    n = res["images"]
    lines = [f"{n} images LR {res['lr_hw'][0]}x{res['lr_hw'][1]}, {res['ran']}", "",
             f"- engine alone: {res['engine_s']:.2f} s ({res['engine_img_s']:.2f} img/s)",
             f"- sequential read -> upscale -> write: {res['sequential_s']:.2f} s ({n / res['sequential_s']:.2f} img/s)",
             f"- CPU time: reading {res['read_cpu_s']:.2f} s, engine {res['engine_cpu_s']:.2f} s; {res['cores']} core(s)",
             "", "| encoder processes | encoders alone (s) | encoders CPU (s) | CPU bound (s) | pipeline (s) | img/s | "
                 "pipeline / slower stage | pipeline / max(slower stage, CPU bound) | bound |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['encoders']} | {r['encoders_s']:.2f} | {r['encoders_cpu_s']:.2f} | {r['cpu_bound_s']:.2f} | "
                     f"{r['pipeline_s']:.2f} | {r['pipeline_img_s']:.2f} | {r['ratio_to_slower_stage']:.2f}x | "
                     f"{r['ratio_to_bound']:.2f}x | {r['bound']} |")
    return "\n".join(lines) + "\n"


def _tiny_gray(seed: int = 0) -> Any:
    import torch

    from medsr.arch import RRDBNet

    g = torch.Generator().manual_seed(seed)
    m = RRDBNet(1, 1, 4, num_feat=8, num_block=1, num_grow_ch=4)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny', a registered name or a weights file")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="LR edge of each input")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--workers", default="1,2", help="encoder process counts, comma-separated")
    ap.add_argument("--inputs", type=Path, default=None, help="folder of radiograph PNGs to crop (else synthetic)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dicom", action="store_true", help="DICOM in, DICOM JPEG 2000 lossless out (else 16-bit PNG)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file")
    a = ap.parse_args(argv)
    import torch

    from medsr.api import Upscaler
    from medsr.bench.runner import TINY

    with tempfile.TemporaryDirectory(prefix="medsr-pipe-") as tmp:
        work = Path(tmp)
        spec = a.model
        if spec == TINY:  # a gray tiny model, like the radiograph models (3x less work than RGB)
            spec = str(work / "tiny.pth")
            torch.save({"params_ema": _tiny_gray().state_dict()}, spec)
        up = Upscaler.load(spec, runtime=a.runtime, device=a.device, precision=a.precision, tile=a.tile)
        inputs = make_inputs(work / "in", a.count, a.size, a.inputs, a.dicom)
        res = measure(up, inputs, [int(k) for k in a.workers.split(",")], work, a.repeats)
    res["cpu_count"] = __import__("os").cpu_count()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
