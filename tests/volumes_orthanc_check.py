"""Run inside a private network namespace by tests/test_volumes_io.py: start Orthanc, upload a source series and
its derived series over REST, print what Orthanc stored as JSON ({study UID: {series UID: instances}}).

Usage: python volumes_orthanc_check.py WORKDIR SOURCE_DIR DERIVED_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BASE = "http://127.0.0.1:8042"


def call(path: str, data: bytes | None = None) -> object:
    req = urllib.request.Request(BASE + path, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main() -> int:
    root, src, der = (Path(a) for a in sys.argv[1:4])
    cfg = {"Name": "medsr-volumes", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
           "HttpPort": 8042, "DicomPort": 4242, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
           "Plugins": [], "SaveJobs": False}
    (root / "orthanc.json").write_text(json.dumps(cfg))
    with open(root / "orthanc.log", "wb") as log:
        proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(300):
                try:
                    call("/system")
                    break
                except OSError:
                    if proc.poll() is not None:
                        print(json.dumps({"error": "Orthanc exited"}))
                        return 1
                    time.sleep(0.2)
            statuses = [call("/instances", f.read_bytes())["Status"]  # type: ignore[index]
                        for d in (src, der) for f in sorted(d.iterdir())]
            stored: dict[str, dict[str, int]] = {}
            for sid in call("/studies"):  # type: ignore[union-attr]
                study = call(f"/studies/{sid}")
                uid = study["MainDicomTags"]["StudyInstanceUID"]  # type: ignore[index]
                for ser in study["Series"]:  # type: ignore[index]
                    series = call(f"/series/{ser}")
                    stored.setdefault(uid, {})[series["MainDicomTags"]["SeriesInstanceUID"]] = len(  # type: ignore[index]
                        series["Instances"])  # type: ignore[index]
            print(json.dumps({"statuses": sorted(set(statuses)), "stored": stored}))
            return 0
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
