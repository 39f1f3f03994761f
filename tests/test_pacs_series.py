"""medsr-node with CT/MR series ([volumes]): collected per series until stable, upscaled through-plane with a tiny
x1 model, forwarded as one derived series; refusals dead-lettered with the reason; restarts and crashes."""

from __future__ import annotations

import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from pacs_helpers import (
    CollectingSCP,
    ct_series,
    free_port,
    node_toml,
    send,
    tiny_volume,
    tiny_weights,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

CT = "1.2.840.10008.5.1.4.1.1.2"
STABLE = 3.0  # generous: a loaded 2-core VM may take a second per C-STORE


def _config(tmp_path: Path, dest_port: int, stable_age: float = STABLE, extra: str = "") -> Any:
    from medsr.pacs import parse_config

    text = node_toml(tmp_path / "spool", free_port(), dest_port, weights=tmp_path / "unused.pth",
                     syntax="explicit-le", extra=f"[volumes]\nstable_age = {stable_age}\n{extra}")
    data = tomllib.loads(text)
    data["model"] = {}
    data["metrics"]["status_interval"] = 0
    return parse_config(data, tmp_path)


def _node(cfg: Any) -> Any:
    from pacs_helpers import tiny_upscaler

    from medsr.pacs import Node

    return Node(cfg, upscalers=[tiny_upscaler()], volume=tiny_volume())


def _derived_series(dest: CollectingSCP) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for ds in list(dest.received.values()):
        out.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return out


@pytest.fixture
def dest():
    scp = CollectingSCP().start()
    yield scp
    scp.stop()


def test_ct_series_sent_slice_by_slice_arrives_as_one_derived_series(tmp_path: Path, dest: CollectingSCP) -> None:
    srcs = ct_series(tmp_path / "src", "1.2.826.0.1.3680043.8.498.77.1")
    with _node(_config(tmp_path, dest.port)) as node:
        t_last = 0.0
        t_first = time.monotonic()
        for ds in srcs:  # one association per slice, 1 s apart: over 4 s in all, longer than the quiet time
            assert send(node.port, [ds]) == [0]
            t_last = time.monotonic()
            time.sleep(1.0)
        assert t_last - t_first > STABLE
        # the quiet time counts from the last instance, not the first
        assert node.queue.count("received") + node.queue.count("processing") == 5
        assert not dest.received and time.monotonic() - t_last < STABLE
        assert wait_for(lambda: len(dest.received) == 10, 60), f"arrived: {len(dest.received)}"
        assert time.monotonic() - t_last >= STABLE
        assert wait_for(lambda: node.queue.count("outgoing") == 0, 10)
        delivered = node.queue.items("delivered")
        members = [i for i in delivered if i.series == srcs[0].SeriesInstanceUID]
        assert len(members) == 5 and all("derived series" in (i.last_error or "") for i in members)
    series = _derived_series(dest)
    assert len(series) == 1  # one derived series ...
    (uid, dss), = series.items()
    assert uid != srcs[0].SeriesInstanceUID
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    assert len(dss) == 10  # 5 slices of 3 mm -> 10 of 1.5 mm (the in-plane spacing)
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    assert np.allclose(np.diff(z), 1.5)
    assert all(d.StudyInstanceUID == srcs[0].StudyInstanceUID for d in dss)  # ... in the same study
    assert all(d.FrameOfReferenceUID == srcs[0].FrameOfReferenceUID for d in dss)
    assert all(d.SOPClassUID == CT and d.ImageType[0] == "DERIVED" for d in dss)
    assert all((d.Rows, d.Columns) == (24, 28) for d in dss)
    assert [d.InstanceNumber for d in dss] == list(range(1, 11))
    assert all(c == 1 for c in dest.counts.values())
    assert all(float(d.RescaleIntercept) == float(srcs[0].RescaleIntercept) for d in dss)  # HU kept
    assert all(d.pixel_array.shape == (24, 28) for d in dss)


def test_resent_series_same_uids_late_slices_a_new_series(tmp_path: Path, dest: CollectingSCP) -> None:
    """The rule for instances arriving after their series was processed: they form a new collection. The
    whole series re-sent gives the same derived UIDs (the PACS keeps one copy); another set of slices gives
    another derived series, never other pixels under UIDs already sent."""
    srcs = ct_series(tmp_path / "src", "1.2.826.0.1.3680043.8.498.77.2")
    with _node(_config(tmp_path, dest.port)) as node:
        assert send(node.port, srcs) == [0] * 5
        assert wait_for(lambda: len(dest.received) == 10, 60)
        first = set(dest.received)
        assert send(node.port, srcs) == [0] * 5  # the whole series again
        assert wait_for(lambda: sum(dest.counts.values()) == 20, 60)
        assert set(dest.received) == first and all(c == 2 for c in dest.counts.values())
        assert send(node.port, srcs[:3]) == [0] * 3  # three slices alone (e.g. re-sent late)
        assert wait_for(lambda: len(_derived_series(dest)) == 2, 60)
        assert wait_for(lambda: len(dest.received) == 16, 30)  # 3 slices -> 6


def test_refused_geometry_is_dead_lettered_with_the_reason(tmp_path: Path, dest: CollectingSCP) -> None:
    from medsr.cli.node import main as node_main

    gap = ct_series(tmp_path / "gap", "1.2.826.0.1.3680043.8.498.77.3",
                    positions=[(0, 0, z) for z in (0.0, 3.0, 6.0, 12.0, 15.0)])  # slice at 9 mm missing
    single = ct_series(tmp_path / "single", "1.2.826.0.1.3680043.8.498.77.4", n=1)
    good = ct_series(tmp_path / "good", "1.2.826.0.1.3680043.8.498.77.5", n=3)
    cfg = _config(tmp_path, dest.port, stable_age=1.0)
    with _node(cfg) as node:
        assert send(node.port, gap + single) == [0] * 6  # acknowledged: refused later, with the reason
        assert wait_for(lambda: node.queue.count("dead") == 6, 60), node.queue.counts()
        assert send(node.port, good) == [0] * 3  # the node keeps serving
        assert wait_for(lambda: len(dest.received) == 6, 60)
        assert node.healthy
    assert len(_derived_series(dest)) == 1
    # visible in `medsr-node list`
    toml = tmp_path / "node.toml"
    toml.write_text(node_toml(cfg.spool.path, free_port(), dest.port, weights=tiny_weights(tmp_path / "t.pth")))
    r = CliRunner().invoke(node_main, ["list", "--config", str(toml)])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if "\tseries\t" in ln]
    assert len(lines) == 6, r.output
    gap_lines = [ln for ln in lines if gap[0].SeriesInstanceUID in ln]
    assert len(gap_lines) == 5 and all("missing" in ln or "gap" in ln for ln in gap_lines), r.output
    single_lines = [ln for ln in lines if single[0].SeriesInstanceUID in ln]
    assert len(single_lines) == 1 and "at least 2 slices" in single_lines[0], r.output


def test_restart_before_stable_and_crash_while_processing(tmp_path: Path, dest: CollectingSCP) -> None:
    """Stopped while collecting, then a crash while the series is being worked (its members leased by a run
    that is gone): the next start processes the series once, from the committed timestamps."""
    from medsr.pacs import WorkQueue

    srcs = ct_series(tmp_path / "src", "1.2.826.0.1.3680043.8.498.77.6")
    cfg = _config(tmp_path, dest.port, stable_age=3.0)
    with _node(cfg) as node:
        assert send(node.port, srcs) == [0] * 5
    assert not dest.received  # stopped before the quiet time ended: nothing processed, nothing lost
    q = WorkQueue(cfg.spool.path)
    try:  # a run that claims the ready series and dies (no release)
        assert q.claim_series(60.0) == []  # not stable for 60 s
        assert wait_for(lambda: bool(q.claim_series(3.0)), 10)
    finally:
        q.close()
    with _node(cfg) as node:
        assert wait_for(lambda: len(dest.received) == 10, 60), node.queue.counts()
        assert wait_for(lambda: node.queue.count("outgoing") == 0, 10)
        members = [i for i in node.queue.items("delivered") if i.series]
        assert len(members) == 5 and all(i.crashes == 1 for i in members)
    assert all(c == 1 for c in dest.counts.values())
    assert len(_derived_series(dest)) == 1


def test_volumes_off_refuses_ct_and_config_is_checked(tmp_path: Path, dest: CollectingSCP) -> None:
    from medsr.pacs import ConfigError

    cfg = _config(tmp_path, dest.port, extra="enabled = false\n")
    assert CT not in cfg.accepted_sop_classes
    assert CT in _config(tmp_path, dest.port).accepted_sop_classes
    srcs = ct_series(tmp_path / "src", "1.2.826.0.1.3680043.8.498.77.7", n=2)
    with _node(cfg) as node:
        assert send(node.port, srcs) == [0x0122, 0x0122]
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, dest.port, stable_age=0, extra='factor = 20\nspacing = 1.0\nmodel = "nope"\nfoo = 1\n')
    text = str(e.value)
    for what in ("volumes.stable_age", "volumes.factor", "give factor or spacing", "volumes.model", "volumes.foo"):
        assert what in text, text
    # a node without a volume method accepts no CT/MR, whatever the config says
    from pacs_helpers import tiny_upscaler

    from medsr.pacs import Node

    with Node(replace(cfg, volumes=replace(cfg.volumes, enabled=True)), upscalers=[tiny_upscaler()]) as node:
        assert send(node.port, srcs[:1]) == [0x0122]
    # members collected, then the node restarts without the volume path: dead-lettered (requeue brings them back)
    with _node(_config(tmp_path, dest.port, stable_age=60)) as node:
        assert send(node.port, srcs) == [0, 0]
    with Node(cfg, upscalers=[tiny_upscaler()]) as node:
        dead = node.queue.items("dead")
        assert len(dead) == 2 and all("[volumes]" in (d.last_error or "") for d in dead)


def test_queue_series_claim_and_schema_upgrade(tmp_path: Path) -> None:
    import sqlite3

    from medsr.pacs import WorkQueue

    # a spool of an earlier version (no series column) is upgraded in place
    db = sqlite3.connect(tmp_path / "queue.db")
    db.executescript("CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, file TEXT NOT NULL, "
                     "state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0, "
                     "last_error TEXT, dead_stage TEXT, due REAL NOT NULL, failing_since REAL, lease TEXT, "
                     "derived_uid TEXT, calling_ae TEXT, peer TEXT, created REAL NOT NULL, updated REAL NOT NULL);"
                     "INSERT INTO items (key, file, state, due, created, updated) VALUES ('1.2', 'f', 'dead', 0, 0, 0);")
    db.close()
    q = WorkQueue(tmp_path)
    try:
        assert q.items("dead")[0].series is None
        a = [q.add(f"1.2.3.{i}", b"x", series="1.2.3") for i in range(3)]
        q.add("1.2.9", b"x")  # a 2D instance
        assert q.claim_series(60.0) == []  # not stable yet
        got = q.claim("received")
        assert got is not None and got.key == "1.2.9"  # the 2D path never takes a series member
        assert q.claim("received") is None
        q.db.execute("UPDATE items SET created = created - 100 WHERE series = '1.2.3'")
        members = q.claim_series(60.0)
        assert [m.id for m in members] == a and all(m.state == "processing" for m in members)
        late = q.add("1.2.3.9", b"x", series="1.2.3")
        q.db.execute("UPDATE items SET created = created - 100 WHERE id = ?", (late,))
        assert q.claim_series(60.0) == []  # the first collection of the series is still being worked
        for m in members:
            q.dead(m, "series", "test")
        assert [m.id for m in q.claim_series(60.0)] == [late]
    finally:
        q.close()
