"""Triton: the model repository (medsr-export --triton), the client backend (Upscaler.from_triton,
medsr-infer --triton) at the protocol level, and a round trip through a real tritonserver process.

The real server is the tritonserver shipped in the nvidia-pytriton wheel, serving the exported repository
with the ONNX run by ONNX Runtime (CPU) in Triton's Python backend (tests/triton_helpers.py says why not
PyTriton's own API). When it cannot run here, those tests skip with the exact reason.
"""

from __future__ import annotations

import importlib.util
import threading
import time
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import make_cr, tiny_rrdb
from triton_helpers import ServerUnavailable, TritonServer, free_port, python_backend_repo

from medsr.api import Upscaler
from medsr.export import export_onnx, make_sidecar, profile_for_tiles, write_sidecar
from medsr.export.triton import export_triton, render_config, validate_config
from medsr.runtime import TileConfig
from medsr.runtime.backend import BackendError
from medsr.runtime.triton_backend import TritonBackend, parse_url

HAS_CLIENT = importlib.util.find_spec("tritonclient") is not None
needs_client = pytest.mark.skipif(not HAS_CLIENT, reason="tritonclient not installed (pip install 'medsr[triton]')")
pytestmark = pytest.mark.timeout(180)  # the real server starts in ~5 s; a hang must not stall CI
SHA = "cd" * 32
SCALE = 2


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny x2 gray RRDBNet exported to ONNX (fp32; x2 pixel-unshuffles: size multiple 2)."""
    d = tmp_path_factory.mktemp("onnx")
    return export_onnx(tiny_rrdb(SCALE, 1, seed=3), d / "tiny.onnx", model_id="tiny-x2", weights_sha256=SHA).path


def _parse(path: Path) -> Any:
    cfg = validate_config(path.read_text())
    assert cfg is not None
    return cfg


# ----------------------------------------------------------------------------------- repository


@needs_client
def test_repository_layout_and_config_validates(tiny_onnx: Path, tmp_path: Path) -> None:
    t = export_triton(tiny_onnx, tmp_path / "repo", name="sr", batch=2, max_batch=6)
    assert t.validated
    assert sorted(p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo").rglob("*")) == [
        "sr", "sr/1", "sr/1/model.onnx", "sr/config.pbtxt"]  # no staging left behind
    assert t.model_path.read_bytes() == tiny_onnx.read_bytes()
    cfg = _parse(t.config_path)
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("sr", "onnxruntime_onnx", 6)
    (i,), (o,) = cfg.input, cfg.output
    assert (i.name, o.name) == ("input", "output")
    assert list(i.dims) == [1, -1, -1] and list(o.dims) == [1, -1, -1]
    from tritonclient.grpc import model_config_pb2 as pb

    assert i.data_type == o.data_type == pb.TYPE_FP32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 6]
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 1)]
    assert list(cfg.version_policy.specific.versions) == [1]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["medsr.scale"] == "2" and params["medsr.weights_sha256"] == SHA
    assert params["medsr.model_id"] == "tiny-x2" and params["medsr.precision"] == "fp32"
    assert '"arch": "RRDBNet"' in params["medsr.descriptor"]  # JSON survives the text-format quoting


@needs_client
def test_fp16_models_keep_their_graph_io(tiny_onnx: Path, tmp_path: Path) -> None:
    # medsr's fp16 export casts inside the graph: I/O stays FP32, precision fp16
    r16 = export_onnx(tiny_rrdb(SCALE, 1, seed=3), tmp_path / "tiny.fp16.onnx", precision="fp16", model_id="t",
                      weights_sha256=SHA)
    from tritonclient.grpc import model_config_pb2 as pb

    t = export_triton(r16.path, tmp_path / "repo", kind="cpu")
    cfg = _parse(t.config_path)
    assert cfg.name == "tiny" and cfg.input[0].data_type == cfg.output[0].data_type == pb.TYPE_FP32
    assert cfg.parameters["medsr.precision"].string_value == "fp16"
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    # a graph with fp16 I/O gets TYPE_FP16
    m = onnx.load(str(tiny_onnx))
    for t_ in (*m.graph.input, *m.graph.output):
        t_.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(m, str(tmp_path / "half_io.onnx"))
    t = export_triton(tmp_path / "half_io.onnx", tmp_path / "repo")
    cfg = _parse(t.config_path)
    assert cfg.name == "half_io" and cfg.input[0].data_type == cfg.output[0].data_type == pb.TYPE_FP16


@needs_client
def test_tensorrt_plan_config_from_sidecar(tmp_path: Path) -> None:
    desc = tiny_rrdb(4, 1).descriptor
    plan = tmp_path / "cxr.plan"
    plan.write_bytes(b"serialized engine")
    for fixed in (False, True):
        prof = profile_for_tiles(desc, tile=64, overlap=8, batch=2, max_batch=4, min_hw=64 if fixed else None)
        write_sidecar(plan, make_sidecar(model_id="m", descriptor=desc, precision="fp16", profile=prof,
                                         io={"input": {"mode": "input", "dtype": "float32"},
                                             "output": {"mode": "output", "dtype": "float32"}},
                                         tensorrt_version="10.9.0", gpu_name="NVIDIA H100", compute_capability=(9, 0),
                                         weights_sha256=SHA))
        t = export_triton(plan, tmp_path / "repo", name="cxr", max_batch=16, version=1 + fixed)
        cfg = _parse(t.config_path)
        assert cfg.platform == "tensorrt_plan" and t.model_path.name == "model.plan"
        assert cfg.max_batch_size == 4  # the profile's max batch, not the 16 asked for
        assert list(cfg.input[0].dims) == ([1, 64, 64] if fixed else [1, -1, -1])
        assert list(cfg.output[0].dims) == ([1, 256, 256] if fixed else [1, -1, -1])
        assert cfg.parameters["medsr.tensorrt_version"].string_value == "10.9.0"
        assert list(cfg.version_policy.specific.versions) == [1 + fixed]
    assert sorted(p.name for p in (tmp_path / "repo" / "cxr").iterdir()) == ["1", "2", "config.pbtxt"]


def test_existing_version_is_never_replaced_silently(tiny_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    t = export_triton(tiny_onnx, repo, name="sr")
    t.model_path.write_bytes(b"the model in production")
    before = t.config_path.read_text()
    with pytest.raises(FileExistsError, match="version 1 exists"):
        export_triton(tiny_onnx, repo, name="sr", max_batch=2)
    assert t.model_path.read_bytes() == b"the model in production" and t.config_path.read_text() == before
    t2 = export_triton(tiny_onnx, repo, name="sr", version=2)
    assert (repo / "sr" / "1" / "model.onnx").read_bytes() == b"the model in production"
    assert "versions: [ 2 ]" in t2.config_path.read_text()
    export_triton(tiny_onnx, repo, name="sr", overwrite=True)
    assert t.model_path.read_bytes() == tiny_onnx.read_bytes()
    assert sorted(p.name for p in repo.iterdir()) == ["sr"] and sorted(p.name for p in (repo / "sr").iterdir()) == [
        "1", "2", "config.pbtxt"]
    with pytest.raises(ValueError, match="model name"):
        export_triton(tiny_onnx, repo, name="../evil")


def test_render_without_tritonclient_is_plain_text(tiny_onnx: Path) -> None:
    from medsr.export.triton import config_for_onnx

    text = render_config(config_for_onnx(tiny_onnx, "sr"))
    assert 'platform: "onnxruntime_onnx"' in text and "dims: [ 1, -1, -1 ]" in text and "KIND_GPU" in text
    assert '\\"scale\\": 2' in text  # JSON descriptor escaped inside a text-format string


@needs_client
def test_cli_export_triton(tmp_path: Path) -> None:
    from medsr.cli.export import main

    w = tmp_path / "w.pth"
    torch.save({"params_ema": tiny_rrdb(2, 3).state_dict()}, w)
    base = ["--weights", str(w), "--recipe", "retina_x2", "--onnx-only", "-o", str(tmp_path / "r.onnx"),
            "--triton", str(tmp_path / "repo"), "--batch", "2", "--max-batch", "4"]
    args = [*base, "--no-fp16", "--triton-kind", "cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "validated as Triton ModelConfig" in r.output
    cfg = _parse(tmp_path / "repo" / "retina_x2" / "config.pbtxt")
    assert cfg.max_batch_size == 4 and list(cfg.input[0].dims) == [3, -1, -1]
    assert (tmp_path / "repo" / "retina_x2" / "1" / "model.onnx").read_bytes() == (tmp_path / "r.onnx").read_bytes()
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "version 1 exists" in r.output and "--triton-overwrite" in r.output
    r = CliRunner().invoke(main, [*args, "--triton-version", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*args, "--triton-platform", "tensorrt"])
    assert r.exit_code == 2 and "--onnx-only" in r.output
    # GPU instances serve the fp16 ONNX when one is exported (fp32 I/O: the casts are inside the graph)
    r = CliRunner().invoke(main, [*base, "--fp16", "--triton-kind", "gpu", "--triton-name", "sr16"])
    assert r.exit_code == 0, r.output
    cfg = _parse(tmp_path / "repo" / "sr16" / "config.pbtxt")
    assert cfg.parameters["medsr.precision"].string_value == "fp16" and cfg.input[0].data_type == 11  # TYPE_FP32
    assert (tmp_path / "repo" / "sr16" / "1" / "model.onnx").read_bytes() == (tmp_path / "r.fp16.onnx").read_bytes()


# ----------------------------------------------------------------------------------- client (protocol level)


def test_parse_url() -> None:
    assert parse_url("localhost:8001") == ("grpc", "localhost:8001", False)
    assert parse_url("grpc://triton") == ("grpc", "triton:8001", False)
    assert parse_url("http://10.0.0.5:9000/") == ("http", "10.0.0.5:9000", False)
    assert parse_url("https://triton.example.org") == ("http", "triton.example.org:443", True)
    for bad in ("ftp://x", "http://", "http://h:8000/v2/models", "http://h:port"):
        with pytest.raises(BackendError, match="Triton URL"):
            parse_url(bad)


def _server_config(tiny_onnx: Path, **changes: Any) -> dict[str, Any]:
    """The model configuration a server returns for the exported tiny model (tritonclient's JSON form)."""
    from google.protobuf.json_format import MessageToDict

    from medsr.export.triton import config_for_onnx

    cfg = replace(config_for_onnx(tiny_onnx, "sr", batch=2, max_batch=4), **changes)
    return MessageToDict(validate_config(render_config(cfg)), preserving_proto_field_name=True)


class _FakeClient:
    """A tritonclient.grpc client answering from canned data; records the requests it gets."""

    config: dict[str, Any] = {}
    requests: list[tuple[list[int], str, np.ndarray]] = []

    def __init__(self, url: str, ssl: bool = False) -> None:
        self.url = url

    def is_server_live(self, **kw: Any) -> bool:
        return True

    def is_model_ready(self, model: str, version: str = "", **kw: Any) -> bool:
        return model == "sr"

    def get_model_repository_index(self, **kw: Any) -> dict[str, Any]:
        return {"models": [{"name": "sr", "version": "1", "state": "READY"}]}

    def get_model_config(self, model: str, version: str = "", **kw: Any) -> dict[str, Any]:
        return {"config": self.config}

    def infer(self, model: str, inputs: list[Any], **kw: Any) -> Any:
        (inp,) = inputs
        dt = {"FP32": np.float32, "FP16": np.float16}[inp.datatype()]
        x = np.frombuffer(inp._get_content(), dtype=dt).reshape(inp.shape())
        _FakeClient.requests.append((inp.shape(), inp.datatype(), x))
        y = x.repeat(SCALE, axis=2).repeat(SCALE, axis=3)  # nearest-neighbour x2 "model"
        return types.SimpleNamespace(as_numpy=lambda name: y if name == "output" else None)

    def close(self) -> None:
        pass


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path) -> type[_FakeClient]:
    import tritonclient.grpc as grpcclient

    from medsr.runtime import triton_backend

    mod = types.SimpleNamespace(InferenceServerClient=_FakeClient, InferInput=grpcclient.InferInput,
                                InferRequestedOutput=grpcclient.InferRequestedOutput)
    monkeypatch.setattr(triton_backend, "_client_module", lambda protocol: mod)
    _FakeClient.config = _server_config(tiny_onnx)
    _FakeClient.requests = []
    return _FakeClient


@needs_client
def test_client_learns_the_model_from_the_server(fake_server: type[_FakeClient]) -> None:
    b = TritonBackend("grpc://triton:8001", "sr")
    assert (b.scale, b.channels, b.model_id, b.weights_sha256, b.precision) == (2, 1, "tiny-x2", SHA, "fp32")
    assert b.preferred_batch == 4 and b.tile_limits().max_batch == 4 and b.tile_limits().multiple == 2
    x = torch.rand(6, 1, 8, 10)
    y = b.run(x)
    # 6 tiles, max_batch_size 4: two batched requests, FP32, [N, C, h, w]
    assert [(s, dt) for s, dt, _ in fake_server.requests] == [([4, 1, 8, 10], "FP32"), ([2, 1, 8, 10], "FP32")]
    assert np.array_equal(np.concatenate([r[2] for r in fake_server.requests]), x.numpy())
    assert torch.equal(y, x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    # an fp16-I/O model gets FP16 tiles
    cfg = _FakeClient.config
    for t in (*cfg["input"], *cfg["output"]):
        t["data_type"] = "TYPE_FP16"
    fake_server.requests = []
    TritonBackend("grpc://triton:8001", "sr", batch=3).run(x[:3])
    assert [(s, dt) for s, dt, _ in fake_server.requests] == [([3, 1, 8, 10], "FP16")]
    # Upscaler.from_triton: fixed-shape tiles (fit=False) so the server's dynamic batcher can merge requests
    up = Upscaler.from_triton("triton:8001", "sr", tile=16, overlap=4)
    assert up.config.fit is False and up.model_id == "tiny-x2" and up.weights_sha256 == SHA
    fake_server.requests = []
    up(np.zeros((20, 20), np.uint16))
    assert {tuple(s[2:]) for s, _, _ in fake_server.requests} == {(16, 16)}


@needs_client
@pytest.mark.parametrize("change,match", [
    ({"parameters": {}}, "no medsr.* parameters"),
    ({"max_batch_size": 0}, "max_batch_size is 0"),
    ({"input": [{"name": "images", "data_type": "TYPE_FP32", "dims": ["1", "-1", "-1"]}]}, "inputs \\['images'\\]"),
    ({"input": [{"name": "input", "data_type": "TYPE_UINT8", "dims": ["1", "-1", "-1"]}]}, "datatype TYPE_UINT8"),
    ({"input": [{"name": "input", "data_type": "TYPE_FP32", "dims": ["3", "-1", "-1"]}]}, "do not match"),
    ({"output": [{"name": "output", "data_type": "TYPE_FP32", "dims": ["-1", "-1"]}]}, "not \\[C, H, W\\]"),
])
def test_client_refuses_models_off_the_contract(fake_server: type[_FakeClient], change: dict[str, Any],
                                                match: str) -> None:
    fake_server.config = {**fake_server.config, **change}
    with pytest.raises(BackendError, match=match) as e:
        TritonBackend("grpc://triton:8001", "sr")
    assert "Triton grpc://triton:8001 model 'sr'" in str(e.value)


@needs_client
def test_client_refuses_wrong_scale_precision_and_missing_model(fake_server: type[_FakeClient]) -> None:
    with pytest.raises(BackendError, match="x2 .* x4 was requested"):
        TritonBackend("triton:8001", "sr", expect_scale=4)
    with pytest.raises(BackendError, match="served model is fp32, not fp16"):
        Upscaler.from_triton("triton:8001", "sr", precision="fp16")
    with pytest.raises(BackendError, match=r"'other': not ready on the server; models there: sr \(READY\)"):
        TritonBackend("triton:8001", "other")


@needs_client
@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_unreachable_server_is_a_clear_error(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="not reachable") as e:
        TritonBackend(url, "sr", timeout_s=5)
    assert url in str(e.value) and "Traceback" not in str(e.value) and time.monotonic() - t0 < 30


@needs_client
def test_cli_infer_triton_arguments(tmp_path: Path) -> None:
    from medsr.cli.infer import main

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    runner = CliRunner()
    r = runner.invoke(main, [str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--triton", "localhost:1"])
    assert r.exit_code == 2 and "--triton needs --model" in r.output
    r = runner.invoke(main, [str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--triton", "localhost:1",
                             "--model", "sr", "--device", "cuda"])
    assert r.exit_code == 2 and "--device" in r.output
    url = f"grpc://127.0.0.1:{free_port()}"
    r = runner.invoke(main, [str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--triton", url, "--model", "sr"])
    assert r.exit_code == 2 and "not reachable" in r.output and url in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not HAS_CLIENT:
        pytest.skip("tritonclient not installed (pip install 'medsr[triton]')")
    d = tmp_path_factory.mktemp("triton")
    exported = export_triton(tiny_onnx, d / "exported", name="tiny", batch=2, max_batch=4, kind="cpu")
    repo = d / "repo"
    repo.mkdir()
    python_backend_repo(exported.model_dir, repo / "tiny")
    try:
        srv = TritonServer(repo, d).__enter__()
    except ServerUnavailable as e:
        pytest.skip(f"a real Triton server cannot run here: {e}")
    try:
        srv.wait_model("tiny")
        yield srv
    finally:
        srv.stop()


CFG = TileConfig(tile=24, overlap=8, batch=3, fit=False)


def _local(tiny_onnx: Path) -> Upscaler:
    """The same tiling on the local ONNX Runtime path."""
    return Upscaler.from_engine(tiny_onnx, runtime="onnxruntime", device="cpu", config=CFG)


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_real_server_round_trip_equals_local_onnxruntime(server: TritonServer, tiny_onnx: Path, proto: str,
                                                         rng: np.random.Generator) -> None:
    url = server.grpc_url if proto == "grpc" else server.http_url
    up = Upscaler.from_triton(url, "tiny", config=CFG)
    assert (up.scale, up.model_id, up.weights_sha256, up.backend.precision) == (2, "tiny-x2", SHA, "fp32")
    local = _local(tiny_onnx)
    gray = rng.integers(0, 65536, (45, 37), dtype=np.uint16)
    rgb = rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)  # per channel through the gray model
    for img in (gray, rgb):
        # bit for bit: the server runs the same model.onnx with the same ONNX Runtime on the same tiles, in
        # the same batches (one client: the dynamic batcher has nothing to merge)
        assert np.array_equal(up(img), local(img))
    up.backend.close()


def test_real_server_cli_infer_folder(server: TritonServer, tiny_onnx: Path, tmp_path: Path) -> None:
    import pydicom

    from medsr.cli.infer import main

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(5)
    cv2.imwrite(str(src / "a.png"), rng.integers(0, 65536, (30, 34), dtype=np.uint16))
    cv2.imwrite(str(src / "sub" / "b.png"), rng.integers(0, 256, (20, 22, 3), dtype=np.uint8))
    make_cr(h=28, w=20).save_as(src / "c.dcm", enforce_file_format=True)
    r = CliRunner().invoke(main, [str(src), "-o", str(tmp_path / "out"), "--triton", server.grpc_url, "--model", "tiny",
                                  "--tile", "24", "--overlap", "8", "--batch", "3", "-q"])
    assert r.exit_code == 0, r.output
    assert "3 written" in r.output
    local = _local(tiny_onnx)
    for rel in ("a.png", "sub/b.png"):
        lr = cv2.imread(str(src / rel), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(cv2.imread(str(tmp_path / "out" / rel), cv2.IMREAD_UNCHANGED), local(lr))
    # DICOM: same pixels as the local run; the runtime that ran the weights is part of the derived identity
    # (docs/io.md), so the Triton run's UIDs are its own, not the local ONNX Runtime run's
    local.upscale_file(src / "c.dcm", tmp_path / "local.dcm")
    a, b = pydicom.dcmread(tmp_path / "out" / "c.dcm"), pydicom.dcmread(tmp_path / "local.dcm")
    assert np.array_equal(a.pixel_array, b.pixel_array)
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert "runtime triton" in str(a.ContributingEquipmentSequence[-1].ContributionDescription)


def test_real_server_concurrent_clients(server: TritonServer, tiny_onnx: Path) -> None:
    """Two clients at once: results unchanged when the dynamic batcher merges their tiles; tiles/s reported."""
    imgs = [np.random.default_rng(i).integers(0, 256, (64, 64), dtype=np.uint8) for i in range(4)]
    want = [_local(tiny_onnx)(im) for im in imgs]
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            up = Upscaler.from_triton(server.grpc_url, "tiny", config=CFG)
            for i in range(k, len(imgs), 2):
                got[i] = up(imgs[i])
            up.backend.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    dt = time.perf_counter() - t0
    assert not errors, errors
    for i, w in enumerate(want):
        # ONNX Runtime computes each image of a batch on its own: merged batches give the same bits
        assert np.array_equal(got[i], w)
    tiles = len(imgs) * Upscaler.from_engine(tiny_onnx, runtime="onnxruntime", device="cpu", config=CFG).plan(64, 64).num_tiles
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(server.grpc_url[len("grpc://"):]).get_inference_statistics("tiny", as_json=True)
    s = stats["model_stats"][0]
    print(f"\n[triton] {tiles} tiles of {CFG.tile}x{CFG.tile} from 2 clients in {dt:.2f} s: {tiles / dt:.0f} tiles/s; "
          f"server since start: {s.get('inference_count')} tiles in {s.get('execution_count')} model executions")
