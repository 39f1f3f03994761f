"""medsr-node configuration: validated at start, every problem named, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO
from pacs_helpers import free_port, node_toml, tiny_weights, wait_listening

pytestmark = pytest.mark.timeout(60)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_valid_config_resolves_relative_paths(tmp_path: Path) -> None:
    from medsr.pacs import load_config

    tiny_weights(tmp_path / "tiny.pth")
    cfg = load_config(_write(tmp_path, node_toml(Path("spool"), 11112, 4242, weights=Path("tiny.pth"))))
    assert cfg.spool.path == tmp_path / "spool"
    assert cfg.model.name == str(tmp_path / "tiny.pth")
    assert cfg.listen.address == "127.0.0.1"  # loopback unless told otherwise
    assert cfg.listen.allowed_calling_aets == ("SENDER",)
    assert cfg.destination.kind == "dicom" and cfg.destination.port == 4242


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    from medsr.pacs import ConfigError, load_config

    text = """
[listen]
ae_title = "A-TITLE-THAT-IS-FAR-TOO-LONG"
port = 70000
prot = 1

[filters]
sop_classes = ["not-a-uid"]

[destination]
type = "dicomweb"
url = "ftp://x"

[model]
name = "no-such-model"
devices = ["tpu"]

[spool]
max_attempts = 0
"""
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    msg = str(e.value)
    for part in ("listen.ae_title", "listen.port: must be an integer between 1 and 65535, got 70000",
                 "listen.prot: unknown setting", "listen.allowed_calling_aets: required",
                 "filters.sop_classes: not a UID: 'not-a-uid'", "destination.url", "model.name: unknown model",
                 "model.devices: not a device: 'tpu'", "spool.path: required", "spool.max_attempts"):
        assert part in msg, (part, msg)
    assert msg.startswith(f"{tmp_path / 'node.toml'}: 10 problem(s):")


@pytest.mark.parametrize(("text", "needle"), [
    ("[listen\n", "not valid TOML"),
    ("", "destination: required"),
    ('[listen]\nallowed_calling_aets = []\n', "must name at least one AE title"),
    ('[destination]\ntype = "dicom"\nhost = "x"\n', "destination.ae_title: required"),
    ('[model]\nname = "missing.pth"\n', "weights file not found"),
    ('[model]\nname = "medsr-cxr-x4"\nengine = "x.onnx"\n', "either name (weights) or engine"),
    ("[spool]\npath = 3\n", "spool.path: must be a string"),
    ('[destination]\ntype = "dicom"\nae_title = "D"\nport = 104\nsyntax = "jpeg-xl"\n',
     "destination.syntax: unknown DICOM output syntax 'jpeg-xl'"),
])
def test_bad_configs(tmp_path: Path, text: str, needle: str) -> None:
    from medsr.pacs import ConfigError, load_config

    with pytest.raises(ConfigError, match=None) as e:
        load_config(_write(tmp_path, text))
    assert needle in str(e.value)


def test_cli_bad_config_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    from medsr.cli.node import main

    r = CliRunner().invoke(main, ["--config", str(_write(tmp_path, "[listen]\nport = 'abc'\n"))])
    assert r.exit_code == 2
    assert "medsr-node: error:" in r.output and "listen.port" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "config file not found" in r.output


def test_cli_check_and_busy_port(tmp_path: Path) -> None:
    from medsr.cli.node import main

    weights = tiny_weights(tmp_path / "tiny.pth")
    cfg = _write(tmp_path, node_toml(tmp_path / "spool", free_port(), 4242, weights=weights))
    r = CliRunner().invoke(main, ["--config", str(cfg), "--check"])
    assert r.exit_code == 0 and "OK" in r.output, r.output
    import socket

    with socket.socket() as s:  # the listen port taken: a clear error, exit 1
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = _write(tmp_path, node_toml(tmp_path / "spool", s.getsockname()[1], 4242, weights=weights))
        r = CliRunner().invoke(main, ["--config", str(cfg)])
    assert r.exit_code == 1 and "cannot listen on 127.0.0.1" in r.output, r.output


def test_second_node_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    from medsr.pacs import SpoolError, WorkQueue

    s = WorkQueue(tmp_path / "spool")
    try:
        with pytest.raises(SpoolError, match="in use by another medsr-node"):
            WorkQueue(tmp_path / "spool")
    finally:
        s.close()


@pytest.mark.timeout(600)  # node processes start slowly on a loaded VM
def test_sigterm_stops_the_node_gracefully(tmp_path: Path) -> None:
    port = free_port()
    cfg = _write(tmp_path, node_toml(tmp_path / "spool", port, free_port(), weights=tiny_weights(tmp_path / "t.pth")))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "medsr.cli.node", "-c", str(cfg)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_listening(port, p, 300)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 0, out
    assert "signal SIGTERM: stopping" in out and "stopped: received 0" in out and "Traceback" not in out


def test_node_loads_its_model_by_the_rule_of_medsr_infer(tmp_path: Path) -> None:
    """No [model] precision: the node's upscaler is what Upscaler.load (medsr-infer) picks on that device;
    an explicit precision is honoured."""
    import importlib.util

    from medsr import Upscaler
    from medsr.cli.node import build_upscalers
    from medsr.pacs import load_config

    w = tiny_weights(tmp_path / "tiny.pth")
    text = node_toml(tmp_path / "spool", free_port(), 104, weights=w)
    cfg = load_config(_write(tmp_path, text))
    assert cfg.model.precision is None
    (up,) = build_upscalers(cfg)
    ref = Upscaler.load(str(w), device="cpu")
    assert (up.backend.name, up.backend.precision) == (ref.backend.name, ref.backend.precision)
    if importlib.util.find_spec("openvino") is not None:
        assert up.backend.name == "openvino"
    cfg = load_config(_write(tmp_path, text.replace("[model]\n", '[model]\nprecision = "fp32"\n')))
    (up,) = build_upscalers(cfg)
    assert up.backend.precision == "fp32" and up.config.tile == 32 and up.config.overlap == 4
