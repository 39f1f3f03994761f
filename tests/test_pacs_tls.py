"""medsr-node over TLS: SCP with mutual TLS (client certificates from a CA made here with the openssl CLI),
C-STORE SCU to a TLS destination checking its certificate. Loopback only."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from pacs_helpers import CR, CollectingSCP, expected_derived_uid, free_port, source, tiny_upscaler, wait_for

pytestmark = pytest.mark.timeout(180)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed CA and three certificates it signed: node (server), dest (server), sender (client);
    plus a rogue client certificate from another CA."""
    if not shutil.which("openssl"):
        pytest.skip("skipped: openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=medsr test {ca}", cwd=d)
    for name, ca in (("node", "ca"), ("dest", "ca"), ("sender", "ca"), ("rogue", "rogue-ca")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", "/CN=localhost", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def _client_ctx(pki: Path, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def _store(port: int, ctx: ssl.SSLContext, ds) -> int | None:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CR, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSR", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return None
    try:
        st = assoc.send_c_store(ds)
        return int(st.Status) if st and "Status" in st else None
    finally:
        assoc.release()


def test_mutual_tls_on_both_sides(tmp_path: Path, pki: Path) -> None:
    import tomllib

    from pacs_helpers import node_toml

    from medsr.pacs import Node, parse_config

    dest_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    dest_ctx.load_cert_chain(str(pki / "dest.pem"), str(pki / "dest.key"))
    dest_ctx.load_verify_locations(cafile=str(pki / "ca.pem"))
    dest_ctx.verify_mode = ssl.CERT_REQUIRED  # the destination wants the node's client certificate
    with CollectingSCP(ssl_context=dest_ctx) as dest:
        data = tomllib.loads(node_toml(tmp_path / "spool", free_port(), dest.port, weights=tmp_path / "x.pth"))
        data["model"] = {}
        data["metrics"]["status_interval"] = 0
        data["listen"].update(tls_cert=str(pki / "node.pem"), tls_key=str(pki / "node.key"),
                              tls_ca=str(pki / "ca.pem"))
        data["destination"].update(tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "node.pem"),
                                   tls_key=str(pki / "node.key"), tls_server_name="localhost")
        cfg = parse_config(data, tmp_path)
        with Node(cfg, upscalers=[tiny_upscaler()]) as n:
            s = source(1)
            assert _store(n.port, _client_ctx(pki, "sender"), s) == 0
            assert wait_for(lambda: expected_derived_uid(s) in dest.received, 30)
            assert _store(n.port, _client_ctx(pki, None), source(2)) is None  # no client certificate
            assert _store(n.port, _client_ctx(pki, "rogue"), source(3)) is None  # signed by another CA
            assert n.queue.counts()["delivered"] == 1
        # a destination whose certificate the node does not trust: retried, never delivered, never dead
        cfg2 = replace(cfg, destination=replace(cfg.destination, tls_ca=pki / "rogue-ca.pem"),
                       spool=replace(cfg.spool, path=tmp_path / "spool2"))
        with Node(cfg2, upscalers=[tiny_upscaler()]) as n:
            assert _store(n.port, _client_ctx(pki, "sender"), source(4)) == 0
            assert wait_for(lambda: n.queue.items("outgoing") and n.queue.items("outgoing")[0].attempts >= 2, 30)
            assert expected_derived_uid(source(4)) not in dest.received and n.queue.count("dead") == 0


def test_tls_config_is_checked(tmp_path: Path) -> None:
    from medsr.pacs import ConfigError, parse_config

    data = {"listen": {"allowed_calling_aets": ["A"], "tls_cert": "missing.pem", "tls_ca": "ca.pem"},
            "destination": {"type": "dicomweb", "url": "https://x/dicom-web", "username": "u"},
            "spool": {"path": "s"}}
    with pytest.raises(ConfigError) as e:
        parse_config(data, tmp_path)
    msg = str(e.value)
    assert "listen.tls_cert: file not found" in msg and "tls_cert and tls_key go together" in msg
    assert "destination.username: username and password_file go together" in msg
