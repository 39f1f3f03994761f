"""medsr-node against a real Orthanc. Run by tests/test_pacs_orthanc.py inside a private network
namespace (unshare --net, only loopback up), so Orthanc's 0.0.0.0 sockets reach nothing outside.

Source SCU -> Orthanc (Lua routing) -> medsr-node (CLI process) -> Orthanc, same study.
Ports are fixed: the namespace is private.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pacs_helpers import (
    SCALE,
    ct_series,
    engine_of,
    expected_derived_uid,
    node_toml,
    send,
    source,
    start_node_process,
    stop_process,
    tiny_weights,
    tiny_x1_weights,
    wait_for,
    wait_listening,
)

if os.environ.get("MEDSR_NETNS") != "1":
    pytest.skip("skipped: run by tests/test_pacs_orthanc.py inside a network namespace", allow_module_level=True)

requests = pytest.importorskip("requests")

HTTP, DICOM, NODE, METRICS = 8042, 4242, 11112, 9108
BASE = f"http://127.0.0.1:{HTTP}"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# Orthanc decodes JPEG 2000 (medsr's default output) only through its GDCM plugin (package orthanc-gdcm);
# without it the node sends RLE lossless, which Orthanc's core decodes, so the preview check still holds.
GDCM_PLUGIN = "/usr/share/orthanc/plugins/libOrthancGdcm.so"
ORTHANC_SYNTAX = None if Path(GDCM_PLUGIN).exists() else "rle"
ROUTE_LUA = (Path(__file__).resolve().parents[1] / "docs" / "orthanc" / "medsr-route.lua").read_text()
REPORT: dict[str, Any] = {}


def _queue_counts(spool: Path) -> dict[str, int]:
    """Items per state in a node's work queue (readable while the node runs or after it died)."""
    from medsr.pacs import WorkQueue

    q = WorkQueue(spool, lock=False)
    try:
        return q.counts()
    finally:
        q.close()


def _report(key: str, value: Any) -> None:
    REPORT[key] = value
    path = os.environ.get("MEDSR_PACS_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2))


class Orthanc:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.root / "route.lua").write_text(ROUTE_LUA)
        plugins = [p for p in [DICOMWEB_PLUGIN, GDCM_PLUGIN] if Path(p).exists()]
        cfg = {
            "Name": "medsr-test",
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "HttpPort": HTTP,
            "DicomPort": DICOM,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"medsr": ["MEDSR", "127.0.0.1", NODE]},
            "LuaScripts": [str(self.root / "route.lua")],
            "SaveJobs": False,
            "JobsHistorySize": 100000,
            "DicomScuTimeout": 10,
            "StableAge": 1,
            "UserMetadata": {"MedsrRouted": 4242},
        }
        (self.root / "orthanc.json").write_text(json.dumps(cfg, indent=2))
        self.log = (self.root / "orthanc.log").open("wb")
        # TCP_NODELAY=1: DCMTK (Orthanc's DICOM stack) disables Nagle; without it each C-STORE waits
        # ~40 ms on delayed ACKs (measured: 21 -> 345 small instances/s received)
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen(["Orthanc", str(self.root / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "Orthanc exited"
            try:
                return requests.get(f"{BASE}/system", timeout=1).ok
            except requests.RequestException:
                return False

        assert wait_for(up, 60, 0.2), (self.root / "orthanc.log").read_text()[-2000:]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 30)
            self.proc = None
            self.log.close()

    def get(self, path: str) -> Any:
        r = requests.get(BASE + path, timeout=30)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def post(self, path: str, body: Any) -> Any:
        r = requests.post(BASE + path, data=body if isinstance(body, (str, bytes)) else json.dumps(body), timeout=30)
        r.raise_for_status()
        return r.json() if r.content and "json" in r.headers.get("content-type", "") else r.content

    def lookup(self, uid: str) -> str | None:
        hits = self.post("/tools/lookup", uid)
        return hits[0]["ID"] if hits else None

    def series_sop_uids(self, series_uid: str) -> list[str]:
        sid = self.lookup(series_uid)
        if sid is None:
            return []
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get(f"/series/{sid}/instances")]

    def jobs(self) -> list[dict[str, Any]]:
        return self.get("/jobs?expand")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    assert shutil.which("Orthanc"), "the outer test checks this"
    o = Orthanc(tmp_path_factory.mktemp("orthanc"))
    o.start()
    yield o
    o.stop()


@pytest.fixture
def node(tmp_path: Path):
    """Start/stop/kill medsr-node processes on one spool; all stopped at teardown."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_toml(tmp_path / "spool", NODE, DICOM, weights=tiny_weights(tmp_path / "tiny.pth"),
                             allowed=("ORTHANC",), dest_ae="ORTHANC", metrics_port=METRICS, syntax=ORTHANC_SYNTAX))
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "node.log"

    class Ctl:
        config = cfg
        spool = tmp_path / "spool"
        weights = tmp_path / "tiny.pth"

        def start(self) -> subprocess.Popen[bytes]:
            p = start_node_process(cfg, log)
            procs.append(p)
            assert wait_listening(NODE, p, 300), log.read_text()[-3000:]
            return p

        def log_text(self) -> str:
            return log.read_text()

    yield Ctl()
    for p in procs:
        stop_process(p, signal.SIGKILL)


def _study(n: int, study: str) -> list[Any]:
    return [source(i, study=study) for i in range(n)]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _wait_derived(orthanc: Orthanc, srcs: list[Any], timeout: float, weights: Path) -> list[str]:
    series_uid = _derived_series(srcs[0], weights)
    got: list[str] = []

    def done() -> bool:
        nonlocal got
        got = orthanc.series_sop_uids(series_uid)
        return len(got) >= len(srcs)

    wait_for(done, timeout, 0.5)
    return got


def _derived_series(src: Any, weights: Path) -> str:
    from medsr.fsutil import sha256_file
    from medsr.io.dicom_derive import derived_uids

    return derived_uids(src, "tiny", SCALE, weights_sha256=sha256_file(weights), provenance=engine_of(weights))[1]


@pytest.mark.timeout(400)
def test_round_trip_same_study_with_preview(orthanc: Orthanc, node) -> None:
    proc = node.start()
    orthanc.post("/modalities/medsr/echo", "{}")  # C-ECHO from Orthanc (raises on failure)
    srcs = _study(3, "1.2.826.0.1.3680043.8.498.4242.1")
    assert send(DICOM, srcs, calling="MODALITY", called="ORTHANC") == [0, 0, 0]
    got = _wait_derived(orthanc, srcs, 300, node.weights)
    assert sorted(got) == sorted(expected_derived_uid(s, node.weights) for s in srcs), node.log_text()[-3000:]
    study_id = orthanc.lookup(srcs[0].StudyInstanceUID)
    series = orthanc.get(f"/studies/{study_id}/series")
    assert len(series) == 2  # the source series and the derived series, in the same study
    derived = [s for s in series if s["MainDicomTags"]["SeriesInstanceUID"] == _derived_series(srcs[0], node.weights)][0]
    assert derived["MainDicomTags"]["SeriesDescription"].endswith("[SR x2]")
    inst = derived["Instances"][0]
    tags = orthanc.get(f"/instances/{inst}/simplified-tags")
    assert tags["ImageType"].startswith("DERIVED\\SECONDARY")
    assert (int(tags["Rows"]), int(tags["Columns"])) == (16 * SCALE, 16 * SCALE)
    assert _png_size(orthanc.get(f"/instances/{inst}/preview")) == (16 * SCALE, 16 * SCALE)  # Orthanc renders it
    # the derived instances came back from MEDSR and were not routed again (Lua loop guard)
    assert orthanc.get(f"/instances/{inst}/metadata/RemoteAET") == b"MEDSR"
    metrics = requests.get(f"http://127.0.0.1:{METRICS}/metrics", timeout=5).text
    assert "medsr_node_done_total 3.0" in metrics
    assert stop_process(proc, signal.SIGTERM) == 0
    assert "Traceback" not in node.log_text() and "SECRET" not in node.log_text()


@pytest.mark.timeout(400)
def test_ct_series_comes_back_as_one_derived_series(orthanc: Orthanc, tmp_path: Path) -> None:
    """A CT series stored in Orthanc is routed to the node (Lua, on the stable study), collected until stable
    ([volumes] stable_age), upscaled through-plane (tiny x1 model) and stored back as one new series of the
    same study, which is not routed again."""
    cfg = tmp_path / "ct.toml"
    cfg.write_text(node_toml(tmp_path / "spool", NODE, DICOM, weights=tiny_weights(tmp_path / "tiny.pth"),
                             allowed=("ORTHANC",), dest_ae="ORTHANC", syntax=ORTHANC_SYNTAX,
                             extra=f'[volumes]\nmodel = "{tiny_x1_weights(tmp_path / "tiny_x1.pth")}"\n'
                                   "stable_age = 2\n"))
    log = tmp_path / "ct.log"
    proc = start_node_process(cfg, log)
    try:
        assert wait_listening(NODE, proc, 300), log.read_text()[-3000:]
        study = "1.2.826.0.1.3680043.8.498.4242.6"
        # 5 slices of 3 mm, 1.5 mm pixels, 40x48 (big enough for JPEG 2000, the default with Orthanc's GDCM plugin)
        srcs = ct_series(tmp_path / "src", f"{study}.1", n=5, study=study, rows=40, cols=48)
        assert send(DICOM, srcs, calling="MODALITY", called="ORTHANC") == [0] * 5
        derived: list[dict[str, Any]] = []

        def arrived() -> bool:
            nonlocal derived
            sid = orthanc.lookup(study)
            series = orthanc.get(f"/studies/{sid}/series") if sid else []
            derived = [s for s in series if s["MainDicomTags"]["SeriesInstanceUID"] != f"{study}.1"]
            return bool(derived) and len(derived[0]["Instances"]) >= 10

        assert wait_for(arrived, 300, 0.5), log.read_text()[-3000:]
        assert len(derived) == 1 and len(derived[0]["Instances"]) == 10  # one new series: 5 x 2 slices
        tags = [orthanc.get(f"/instances/{i}/simplified-tags") for i in derived[0]["Instances"]]
        assert all(t["StudyInstanceUID"] == study and t["Modality"] == "CT" for t in tags)
        assert all(t["ImageType"].startswith("DERIVED\\SECONDARY") for t in tags)
        z = sorted(float(t["ImagePositionPatient"].split("\\")[2]) for t in tags)
        assert all(abs(b - a - 1.5) < 1e-3 for a, b in zip(z, z[1:], strict=False)), z
        inst = derived[0]["Instances"][0]
        assert orthanc.get(f"/instances/{inst}/metadata/RemoteAET") == b"MEDSR"
        assert _png_size(orthanc.get(f"/instances/{inst}/preview")) == (48, 40)  # Orthanc decodes it
        time.sleep(4.0)  # the study is stable again: the derived series is not routed back to the node
        assert len(orthanc.get(f"/studies/{orthanc.lookup(study)}/series")) == 2
        assert _queue_counts(tmp_path / "spool")["dead"] == 0
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0
    text = log.read_text()
    assert "Traceback" not in text and "upscaled series" in text, text[-3000:]


@pytest.mark.timeout(400)
def test_stow_rs_destination(orthanc: Orthanc, tmp_path: Path) -> None:
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip("skipped: Orthanc DICOMweb plugin not installed (apt-get install orthanc-dicomweb)")
    cfg = tmp_path / "stow.toml"
    cfg.write_text(node_toml(tmp_path / "spool", NODE + 1, weights=tiny_weights(tmp_path / "tiny.pth"),
                             url=f"{BASE}/dicom-web"))
    proc = start_node_process(cfg, tmp_path / "stow.log")
    try:
        assert wait_listening(NODE + 1, proc)
        srcs = _study(4, "1.2.826.0.1.3680043.8.498.4242.2")
        assert send(NODE + 1, srcs) == [0] * 4  # straight to the node (calling AE SENDER)
        got = _wait_derived(orthanc, srcs, 300, tmp_path / "tiny.pth")
        assert sorted(got) == sorted(expected_derived_uid(s, tmp_path / "tiny.pth") for s in srcs), (tmp_path / "stow.log").read_text()
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0


@pytest.mark.timeout(900)
def test_orthanc_down_for_a_while_then_everything_arrives(orthanc: Orthanc, tmp_path: Path) -> None:
    """The destination (real Orthanc) is stopped while the node receives 40 instances; the node keeps them
    in its spool and retries with backoff; once Orthanc is back all arrive, once each."""
    n = 40
    weights = tiny_weights(tmp_path / "tiny.pth")
    cfg = tmp_path / "down.toml"
    cfg.write_text(node_toml(tmp_path / "spool", NODE + 2, DICOM, weights=weights, dest_ae="ORTHANC",
                             backoff=(0.2, 1.0), syntax=ORTHANC_SYNTAX, extra="[log]\nlevel = \"info\"\n"))
    orthanc.stop()
    proc = start_node_process(cfg, tmp_path / "down.log")
    try:
        assert wait_listening(NODE + 2, proc)
        srcs = _study(n, "1.2.826.0.1.3680043.8.498.4242.5")
        assert send(NODE + 2, srcs) == [0] * n  # the node acknowledges: spooled, the destination is down
        time.sleep(3.0)  # a few failed attempts
        log = (tmp_path / "down.log").read_text()
        assert "forwarded" not in log and "dead-lettered" not in log, log[-2000:]
        orthanc.start()
        got = _wait_derived(orthanc, srcs, 300, weights)
        assert sorted(got) == sorted(expected_derived_uid(s, weights) for s in srcs), log[-2000:]
        assert _queue_counts(tmp_path / "spool")["dead"] == 0
        _report("destination_down", {"instances": n, "down_s": 3.0, "arrived_after_restart": len(got)})
    finally:
        if orthanc.proc is None:
            orthanc.start()
        assert stop_process(proc, signal.SIGTERM) == 0


@pytest.mark.timeout(900)
def test_load_500_then_sigkill_and_restart(orthanc: Orthanc, node) -> None:
    """500 instances through Orthanc -> node -> Orthanc: 0 lost, 0 duplicated; then 500 more with the
    node SIGKILLed mid-run and restarted: 0 lost (Orthanc's failed store jobs resubmitted)."""
    n = 500
    proc = node.start()
    srcs = _study(n, "1.2.826.0.1.3680043.8.498.4242.3")
    t0 = time.monotonic()
    assert send(DICOM, srcs, calling="MODALITY", called="ORTHANC") == [0] * n
    t_sent = time.monotonic() - t0
    got = _wait_derived(orthanc, srcs, 300, node.weights)
    # An Orthanc store job the node did not acknowledge (e.g. an association refused at the per-peer limit while
    # Orthanc opens several at once) is the sender's to retry, as a modality would: resubmitted and counted. An
    # instance the node acknowledged has a succeeded job, is never resubmitted, and must arrive by itself.
    unacked = [j for j in orthanc.jobs() if j["State"] == "Failure" and j["Type"] == "DicomModalityStore"
               and j["Content"]["RemoteAet"] == "MEDSR"]
    for j in unacked:
        orthanc.post(f"/jobs/{j['ID']}/resubmit", "")
    if unacked:
        got = _wait_derived(orthanc, srcs, 300, node.weights)
    late = {}
    if len(got) < n:  # not there yet: where the rest is in the node's queue (a retry backs off in time), then wait
        late = _queue_counts(node.spool)
        got = _wait_derived(orthanc, srcs, 120, node.weights)
    dt = time.monotonic() - t0
    why = [str(j.get("ErrorDescription") or j.get("ErrorDetails") or "")[:200] for j in unacked]
    assert len(got) == n and len(set(got)) == n, (
        f"{len(got)} derived, {len(set(got))} distinct; unacknowledged {why}; queue when late {late}, now "
        f"{_queue_counts(node.spool)}; node log: {node.log_text()[-1500:]}")
    _report("load_500_late_queue_state", late)
    assert set(got) == {expected_derived_uid(s, node.weights) for s in srcs}
    _report("load_500_unacknowledged_resubmitted", {"jobs": len(unacked), "why": why})
    _report("load_500", {
        "instances": n, "lr_size": "16x16", "seconds": round(dt, 2), "instances_per_s": round(n / dt, 1),
        "lr_mp_per_s": round(n * 256 / 1e6 / dt, 4), "send_to_orthanc_s": round(t_sent, 2),
    })

    metrics = requests.get(f"http://127.0.0.1:{METRICS}/metrics", timeout=5).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln.startswith("medsr_node_")}
    _report("node_metrics_after_load", {
        "done": values.get("medsr_node_done_total"),
        "lr_megapixels": values.get("medsr_node_lr_megapixels_total"),
        "upscale_seconds": values.get("medsr_node_upscale_seconds_total"),
        "upscale_lr_mp_per_s": round(values["medsr_node_lr_megapixels_total"]
                                     / max(1e-9, values["medsr_node_upscale_seconds_total"]), 4),
    })
    # the same with a SIGKILL in the middle
    srcs = _study(n, "1.2.826.0.1.3680043.8.498.4242.4")
    series_uid = _derived_series(srcs[0], node.weights)
    import threading

    state: dict[str, Any] = {}

    def killer() -> None:
        wait_for(lambda: len(orthanc.series_sop_uids(series_uid)) >= 100, 60, 0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        state["arrived_at_kill"] = len(orthanc.series_sop_uids(series_uid))
        c = _queue_counts(node.spool)
        state["spooled_at_kill"] = c["received"] + c["processing"] + c["outgoing"]

    t0 = time.monotonic()
    k = threading.Thread(target=killer)
    k.start()
    statuses = send(DICOM, srcs, calling="MODALITY", called="ORTHANC")
    # Orthanc keeps receiving. Its association with the sender has (rarely, once in CI) ended early while
    # the node was killed; a modality re-sends what was not acknowledged, and so does this test (counted in
    # the report). What is asserted is medsr's side: every acknowledged source arrives derived, once.
    resent = [s for s, st in zip(srcs, statuses, strict=True) if st != 0]
    if resent:
        again = send(DICOM, resent, calling="MODALITY", called="ORTHANC")
        assert again == [0] * len(resent), (
            f"{sum(st == 0 for st in again)} of {len(resent)} re-sent stored; Orthanc log: "
            + (orthanc.root / "orthanc.log").read_text(errors="replace")[-3000:])
    k.join(70)
    assert "arrived_at_kill" in state, "the node was never killed"
    time.sleep(1.0)
    node.start()  # restart on the same spool: resumes what it had acknowledged

    def idle() -> bool:
        return all(j["State"] not in ("Pending", "Running") for j in orthanc.jobs())

    assert wait_for(idle, 60, 0.5)
    failed = [  # what Orthanc could not hand over while the node was dead: resubmitted as docs/pacs.md says
        j["ID"] for j in orthanc.jobs()
        if j["State"] == "Failure" and j["Type"] == "DicomModalityStore" and j["Content"]["RemoteAet"] == "MEDSR"
    ]
    for jid in failed:
        orthanc.post(f"/jobs/{jid}/resubmit", "")
    got = _wait_derived(orthanc, srcs, 300, node.weights)
    dt = time.monotonic() - t0
    jobs = orthanc.jobs()
    diag = {"state": state, "resubmitted": len(failed), "jobs": {s: sum(1 for j in jobs if j["State"] == s)
            for s in {j["State"] for j in jobs}}, "node_log": node.log_text()[-1500:]}
    assert len(got) == n and len(set(got)) == n, f"{len(got)} derived, {len(set(got))} distinct; {diag}"
    assert set(got) == {expected_derived_uid(s, node.weights) for s in srcs}
    assert state["arrived_at_kill"] < n
    text = node.log_text()
    assert "spool: resuming" in text or state["spooled_at_kill"] == 0
    _report("kill_restart_500", {**state, "orthanc_jobs_resubmitted": len(failed), "seconds": round(dt, 2),
                                 "sender_resent_to_orthanc": len(resent),
                                 "lost": n - len(set(got))})
