"""A real Triton Inference Server for the tests, on 127.0.0.1 only.

The ``tritonserver`` binary (2.51) and its Python backend come from the nvidia-pytriton wheel (CPU is
enough). The served model is a medsr Triton repository written by ``medsr.export.triton.export_triton``,
its platform swapped for Triton's Python backend: a small ``model.py`` runs the same ``model.onnx`` with
ONNX Runtime on CPU. Everything else in config.pbtxt (I/O, max_batch_size, dynamic batching, version
policy, the medsr parameters the client reads) is what an operator's server would load.

Why not PyTriton's own API (``Triton().bind(infer_func)``): nvidia-pytriton 0.7.0 requires numpy<2, and
under numpy 2 its Python-backend stub (pybind11, built against numpy 1.x) converts numpy arrays wrongly:
``pb_utils.Tensor.as_numpy()`` returns zeros and ``pb_utils.Tensor(name, ndarray)`` sends an empty tensor;
every PyTriton request came back with an empty output (``raw_output_contents: ""``). medsr needs numpy>=2
(imagecodecs, opencv 5, pylibjpeg 2), so the wheel is installed with ``--no-deps`` for its server only,
and model.py moves tensors through DLPack (numpy in, a torch tensor out), which the stub handles correctly.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

#: the Python-backend model: the exported ONNX on ONNX Runtime (CPU, one thread), one run per batch of
#: requests the dynamic batcher hands over (requests of one tile shape are concatenated)
MODEL_PY = '''\
import os

import numpy as np
import onnxruntime as ort
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        # DLPack both ways: under numpy 2 the stub's Tensor.as_numpy() gives zeros, Tensor(name, ndarray) nothing
        xs = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, "input")) for r in requests]
        if all(x.shape[1:] == xs[0].shape[1:] for x in xs):
            y = self.session.run(["output"], {"input": np.concatenate(xs)})[0]
            ys = np.split(y, np.cumsum([x.shape[0] for x in xs])[:-1])
        else:
            ys = [self.session.run(["output"], {"input": x})[0] for x in xs]
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack("output", torch.from_numpy(np.ascontiguousarray(y)))]) for y in ys]
'''


class ServerUnavailable(RuntimeError):
    """The server cannot run on this machine (message: the exact reason)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_dist() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend dir, python backend stub) from nvidia-pytriton, or
    ServerUnavailable saying why not."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise ServerUnavailable(f"PyTriton's tritonserver is built for Linux x86_64, this is {sys.platform} {platform.machine()}")
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ServerUnavailable("nvidia-pytriton is not installed (pip install --no-deps nvidia-pytriton==0.7.0)")
    dist = Path(spec.origin).parent / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not binary.is_file():
        raise ServerUnavailable(f"{binary} is missing from the nvidia-pytriton wheel")
    if not stub.is_file():
        raise ServerUnavailable(f"nvidia-pytriton has no Python-backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ServerUnavailable("this Python is not a shared-library build; the Python-backend stub embeds libpython")
    return binary, dist / "backends" / "python", stub


def python_backend_repo(exported: Path, dest: Path) -> Path:
    """Copy of an exported Triton model directory served by the Python backend (model.py beside model.onnx)."""
    import shutil

    shutil.copytree(exported, dest)
    cfg = dest / "config.pbtxt"
    text = cfg.read_text()
    assert 'platform: "onnxruntime_onnx"' in text, text
    cfg.write_text(text.replace('platform: "onnxruntime_onnx"', 'backend: "python"').replace("KIND_GPU", "KIND_CPU"))
    for version in dest.iterdir():
        if version.is_dir():
            (version / "model.py").write_text(MODEL_PY)
    return dest


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (no orphaned server after a crash)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TritonServer:
    """``with TritonServer(repo, workdir) as s:`` a tritonserver process on free loopback ports; stopped
    (SIGINT, then SIGKILL of its process group) on exit. ``s.grpc_url`` / ``s.http_url`` for clients."""

    def __init__(self, repo: Path, workdir: Path, start_timeout_s: float = 90.0) -> None:
        self.repo = repo
        self.workdir = workdir
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "tritonserver.log"
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> TritonServer:
        binary, backend, stub = server_dist()
        backends = self.workdir / "backends" / "python"
        backends.mkdir(parents=True, exist_ok=True)
        for f in backend.iterdir():
            if f.is_file():
                (backends / f.name).symlink_to(f)
        (backends / "triton_python_backend_stub").symlink_to(stub)
        env = dict(os.environ)
        # the stub must load this interpreter's libpython (not another 3.x of the system) and find this
        # environment's packages (it looks for python3 on PATH, as PyTriton arranges)
        libs = [sysconfig.get_config_var("LIBDIR"), str(binary.parents[2] / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        cmd = [
            str(binary), f"--model-repository={self.repo}", f"--backend-directory={backends.parent}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false", "--allow-gpu-metrics=false", "--exit-on-error=false", "--exit-timeout-secs=5",
            "--model-control-mode=none", "--strict-readiness=false",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._wait("/v2/health/live", ServerUnavailable)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, path: str, error: type[Exception]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise error(f"tritonserver exited with status {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}{path}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise error(f"tritonserver did not answer {path} within {self.start_timeout_s:.0f} s: {self.log_tail()}")

    def wait_model(self, name: str) -> None:
        """Until ``name`` is ready; AssertionError with the server log when it fails to load."""
        self._wait(f"/v2/models/{name}/ready", AssertionError)

    def log_tail(self, n: int = 2000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " ".join(text[-n:].split())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()
