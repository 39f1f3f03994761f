"""Helpers for the medsr-node tests: real pynetdicom peers, tiny images, a tiny model, node configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import REPO, make_cr, tiny_rrdb

CR = "1.2.840.10008.5.1.4.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SCALE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_weights(path: Path) -> Path:
    """A seeded tiny x2 RRDBNet saved as .pth (RGB, folded to gray by medsr)."""
    torch.save({"params_ema": tiny_rrdb(SCALE, 3, seed=7).state_dict()}, path)
    return path


def tiny_x1_weights(path: Path) -> Path:
    """A seeded tiny x1 1-channel RRDBNet saved as .pth: a through-plane model for the volume path."""
    from medsr.arch import RRDBNet

    torch.manual_seed(0)
    torch.save({"params_ema": RRDBNet(1, 1, 1, num_feat=8, num_block=1, num_grow_ch=4).state_dict()}, path)
    return path


def tiny_volume() -> Any:
    """The same tiny x1 model as an in-process VolumeUpscaler (PyTorch, CPU)."""
    from medsr import Upscaler
    from medsr.arch import RRDBNet
    from medsr.runtime import TileConfig, TorchBackend
    from medsr.volumes import VolumeUpscaler

    torch.manual_seed(0)
    m = RRDBNet(1, 1, 1, num_feat=8, num_block=1, num_grow_ch=4).eval()
    return VolumeUpscaler(Upscaler(TorchBackend(m, device="cpu"), TileConfig(tile=32, overlap=4, batch=1),
                                   model_id="tiny_x1"))


def ct_series(folder: Path, series_uid: str, n: int = 5, study: str | None = None, **kw: Any) -> list[Any]:
    """A synthetic CT series (tests/test_volumes_io.make_series: 24x28, 1.5 mm pixels, 3 mm slices), in slice
    order, as datasets to send; ``study``: its StudyInstanceUID (default make_series')."""
    import pydicom
    from test_volumes_io import make_series

    kw = {"rows": 24, "cols": 28, "step": (0, 0, 3.0), "spacing": (1.5, 1.5), "shuffle": False, **kw}
    out = []
    for f in make_series(folder, n=n, series_uid=series_uid, **kw):
        ds = pydicom.dcmread(f)
        if study:
            ds.StudyInstanceUID = study
        out.append(ds)
    return out


def tiny_upscaler() -> Any:
    from medsr import Upscaler
    from medsr.arch import fold_to_gray
    from medsr.runtime import TileConfig, TorchBackend

    m = tiny_rrdb(SCALE, 3, seed=7)
    return Upscaler(
        TorchBackend(m, device="cpu"), TileConfig(tile=32, overlap=4, batch=1), model_id="tiny",
        variants={1: TorchBackend(fold_to_gray(m), device="cpu")},
    )


def source(i: int, study: str = "1.2.826.0.1.3680043.8.498.999.1", h: int = 16, w: int = 16,
           modality: str = "CR") -> Any:
    """A small CR in one study / series; SOP Instance UID unique per ``i``."""
    ds = make_cr(h=h, w=w, seed=i % 97)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.SOPInstanceUID = f"{study}.1.{i + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = i + 1
    ds.Modality = modality
    return ds


def expected_derived_uid(ds: Any, weights: Path | None = None, uid_root: str | None = None) -> str:
    """The derived SOP Instance UID the node sends: the upscaler's (from the weights file's sha256 for a node
    process loading ``weights``, else from the model id "tiny" of an in-process :func:`tiny_upscaler`), made
    pixel-specific by the node (medsr.pacs.identity)."""
    from medsr.fsutil import sha256_file
    from medsr.io.dicom_derive import derived_uids
    from medsr.pacs.identity import final_uids, pixel_digest

    sop, series = derived_uids(ds, "tiny", SCALE, weights_sha256=sha256_file(weights) if weights else None,
                               provenance=engine_of(weights))
    return final_uids(sop, series, pixel_digest(ds), uid_root)[0]


def engine_of(weights: Path | None) -> dict[str, str | None]:
    """The runtime and precision that enter derived UIDs: what a node process picks for ``weights`` on the CPU
    (the loading rule of medsr-infer), or PyTorch fp32 for the in-process :func:`tiny_upscaler`."""
    if weights is None:
        return {"runtime": "torch", "precision": "fp32"}
    from medsr.api import job_provenance

    return job_provenance(weights, device="cpu")


def send(port: int, datasets: Iterable[Any], calling: str = "SENDER", called: str = "MEDSR",
         timeout: float = 20) -> list[int | None]:
    """C-STORE each dataset on one association; the statuses (None: no response / not sent)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt

    from medsr.pacs.forward import scu_open

    datasets = list(datasets)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop in {str(d.SOPClassUID) for d in datasets}:
        ae.add_requested_context(sop, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, scu_open)])
    if not assoc.is_established:
        return [None] * len(datasets)
    out: list[int | None] = []
    try:
        for d in datasets:
            try:
                st = assoc.send_c_store(d)
            except (RuntimeError, ValueError, OSError):
                out.append(None)
                continue
            out.append(int(st.Status) if st and "Status" in st else None)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    out += [None] * (len(datasets) - len(out))
    return out


def send_status(port: int, ds: Any, calling: str = "SENDER") -> tuple[Any, Any]:
    """(association, status dataset) for one instance (association released)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(str(ds.SOPClassUID), ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSR")
    status = None
    if assoc.is_established:
        status = assoc.send_c_store(ds)
        assoc.release()
    return assoc, status


class CollectingSCP:
    """A real Storage SCP (pynetdicom) that keeps what it receives: {SOP Instance UID: dataset}."""

    def __init__(self, ae_title: str = "DEST", port: int | None = None, status: int = 0x0000,
                 delay: float = 0.0, compressed: bool = False, ssl_context: Any = None) -> None:
        self.ae_title = ae_title
        self.ssl_context = ssl_context  # TLS (pynetdicom's start_server ssl_context)
        self.compressed = compressed  # also accept compressed transfer syntaxes (default: uncompressed only)
        self.delay = delay
        self.port = port or free_port()
        self.status = status
        self.received: dict[str, Any] = {}
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        if self.delay:
            time.sleep(self.delay)
        if self.status != 0:
            return self.status
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] = ds
            self.counts[str(ds.SOPInstanceUID)] += 1
        return 0x0000

    def start(self) -> CollectingSCP:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        from medsr.pacs.forward import tcp_nodelay

        ae = AE(ae_title=self.ae_title)
        if self.compressed:
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        else:
            ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                     (evt.EVT_CONN_OPEN, tcp_nodelay)],
                                       ssl_context=self.ssl_context)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> CollectingSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def node_toml(spool: Path, port: int, dest_port: int | None = None, *, weights: Path | None = None,
              allowed: tuple[str, ...] = ("SENDER",), dest_ae: str = "DEST", extra: str = "",
              metrics_port: int = 0, url: str | None = None, backoff: tuple[float, float] = (0.2, 1.0),
              syntax: str | None = None) -> str:
    allowed_s = ", ".join(f'"{a}"' for a in allowed)
    dest = (f'type = "dicomweb"\nurl = "{url}"' if url else
            f'type = "dicom"\nae_title = "{dest_ae}"\nhost = "127.0.0.1"\nport = {dest_port}')
    return f"""
[listen]
ae_title = "MEDSR"
port = {port}
allowed_calling_aets = [{allowed_s}]

[destination]
{dest}
timeout = 10
{f'syntax = "{syntax}"' if syntax else ""}

[model]
name = "{weights}"
tile = 32
overlap = 4
threads = 1

[spool]
path = "{spool}"
backoff_initial = {backoff[0]}
backoff_max = {backoff[1]}

[metrics]
port = {metrics_port}
status_interval = 5
{extra}
"""


def start_node_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "medsr.cli.node", "--config", str(config)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
    )


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 600) -> bool:
    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    return wait_for(up, timeout, 0.1)


def stop_process(proc: subprocess.Popen[bytes], sig: int = 15, timeout: float = 120) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return int(proc.returncode)


def pixels(ds: Any) -> np.ndarray:
    return ds.pixel_array
