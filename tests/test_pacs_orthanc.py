"""Integration with a real Orthanc (Debian package ``orthanc``): source -> Orthanc -> medsr-node -> Orthanc.

Orthanc 1.10 cannot bind to loopback only, so the scenario (tests/pacs_orthanc_inner.py) runs in a
private network namespace (``unshare --net``, only ``lo`` up): nothing listens on a real interface.
The measured throughput is printed (pytest -s) and written to $MEDSR_PACS_REPORT when set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.timeout(1900)  # the scenario's own deadline ends it first
#: sub-cases that may be skipped, with the reason the inner suite gives (an optional Orthanc plugin)
OPTIONAL = ("Orthanc DICOMweb plugin not installed",)


def _netns_prefix() -> list[str]:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        pytest.skip("skipped: unshare or ip (util-linux, iproute2) not installed")
    for prefix in ([unshare, "--net"], [unshare, "--map-root-user", "--net"]):
        probe = subprocess.run([*prefix, ip, "link", "set", "lo", "up"], capture_output=True, timeout=20)
        if probe.returncode == 0:
            return prefix
    pytest.skip(f"skipped: cannot create a network namespace ({probe.stderr.decode(errors='replace').strip()})")


def test_orthanc_round_trip_load_and_kill(tmp_path: Path) -> None:
    if not shutil.which("Orthanc"):
        pytest.skip("skipped: Orthanc not installed (apt-get install orthanc orthanc-dicomweb)")
    prefix = _netns_prefix()
    report = tmp_path / "report.json"
    env = dict(os.environ, MEDSR_NETNS="1", MEDSR_PACS_REPORT=str(report),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    inner = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsx", "tests/pacs_orthanc_inner.py"]
    cmd = [*prefix, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]
    # own process group: on a timeout Orthanc and the nodes die with the scenario (and the namespace)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"Orthanc scenario timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    last = out.strip().splitlines()[-1]
    assert not re.search(r"\d+ (failed|errors?)\b", last), out[-3000:]
    passed, skipped = (int(m[1]) if (m := re.search(rf"(\d+) {w}", last)) else 0 for w in ("passed", "skipped"))
    reasons = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert passed + skipped == 5 and len(reasons) == skipped, out[-3000:]
    for r in reasons:  # only an absent optional plugin may skip a sub-case; it is shown, not hidden
        assert any(o in r for o in OPTIONAL), f"unexpected skip in the Orthanc scenario: {r}"
        print(f"\nOrthanc scenario sub-case {r}")
    figures = json.loads(report.read_text())
    print("\nmedsr-node with Orthanc:", json.dumps(figures, indent=2))
    assert figures["kill_restart_500"]["lost"] == 0
