"""medsr-node configuration: one TOML file, validated at start; every problem is reported at once.

Relative paths (model, engine, spool) are resolved against the folder holding the TOML file.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsr.io.image import DEFAULT_MAX_PIXELS

#: image storage SOP classes accepted when ``filters.sop_classes`` is not given (projection radiography
#: and single-frame secondary captures: what medsr's models are made for)
DEFAULT_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image Storage",
}

#: CT/MR image storage SOP classes collected into series and upscaled through-plane when ``[volumes]`` is
#: enabled (docs/pacs.md, "CT and MR series")
VOLUME_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
}

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_MODALITY_RE = re.compile(r"^[A-Z0-9_]{1,16}$")


def is_uid(value: str) -> bool:
    return len(value) <= 64 and bool(_UID_RE.match(value))


class ConfigError(ValueError):
    """A configuration problem; the message lists every problem found, one per line."""


@dataclass(frozen=True)
class ListenConfig:
    ae_title: str = "MEDSR"
    address: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    #: calling AE title -> peer addresses (IPs or CIDR networks) it may connect from; an AE not named here
    #: may connect from anywhere (still only if it is in allowed_calling_aets)
    peers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    max_associations: int = 16  # at once, all peers
    max_per_peer: int = 4  # at once, per peer address
    acse_timeout: float = 10.0  # seconds to wait for an A-ASSOCIATE-RQ / A-RELEASE
    dimse_timeout: float = 30.0  # seconds to wait for the next DIMSE message part
    network_timeout: float = 30.0  # seconds an association may stay silent before it is dropped
    max_pdu_size: int = 65536  # the largest P-DATA PDU this node accepts (bytes)
    max_instance_mb: float = 512.0  # a received instance larger than this is refused (and its association aborted)
    min_free_mb: float = 256.0  # below this much free space on the spool, C-STORE answers 0xA700
    tls_cert: Path | None = None  # PEM certificate chain of this node: TLS on the SCP
    tls_key: Path | None = None
    tls_ca: Path | None = None  # CA bundle: when set, peers must present a certificate it signed (mutual TLS)


@dataclass(frozen=True)
class FilterConfig:
    sop_classes: tuple[str, ...] = tuple(DEFAULT_SOP_CLASSES)
    modalities: tuple[str, ...] = ()  # empty: any modality
    max_pixels: int = DEFAULT_MAX_PIXELS  # LR Rows x Columns x frames above this are refused
    on_mismatch: str = "refuse"  # or "ignore": answer success and drop the instance


@dataclass(frozen=True)
class DestinationConfig:
    kind: str = "dicom"  # "dicom" (C-STORE SCU) or "dicomweb" (STOW-RS)
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    calling_ae_title: str = ""  # default: listen.ae_title
    url: str = ""
    timeout: float = 30.0
    syntax: str | None = None  # transfer syntax of the derived objects (medsr.io.dicom_derive.parse_syntax); None: default
    retry_for: float = 86400.0  # seconds an instance may keep failing transiently before it is dead-lettered
    max_pdu_size: int = 65536
    tls_ca: Path | None = None  # C-STORE over TLS / https: CA bundle that signed the destination's certificate
    tls_cert: Path | None = None  # client certificate (mutual TLS), PEM
    tls_key: Path | None = None
    tls_server_name: str = ""  # name checked in the destination's certificate (default: host)
    token_file: Path | None = None  # STOW-RS: a file holding a bearer token
    username: str = ""  # STOW-RS: HTTP basic auth user ...
    password_file: Path | None = None  # ... and a file holding the password


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = None  # registered model or weights file; None: medsr's default model
    engine: Path | None = None  # .onnx / .plan engine instead of weights
    devices: tuple[str, ...] = ("cpu",)  # one worker (one Upscaler) per entry
    precision: str | None = None  # None: medsr-infer's default (medsr.Upscaler.load)
    tile: int | None = None
    overlap: int | None = None
    batch: int | None = None
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    uid_root: str | None = None  # root of the derived UIDs (default: medsr's)


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = Path("spool")
    max_attempts: int = 5  # refusals by the destination (or upscale errors) before dead-lettering
    backoff_initial: float = 1.0  # seconds; doubles per attempt
    backoff_max: float = 60.0
    forwarders: int = 2  # sending threads
    keep_delivered_days: float = 7.0  # delivered items stay listed (not their files) this long


@dataclass(frozen=True)
class MetricsConfig:
    address: str = "127.0.0.1"
    port: int = 0  # 0: no HTTP endpoint
    status_interval: float = 30.0  # seconds between status log lines; 0: none


@dataclass(frozen=True)
class VolumesConfig:
    enabled: bool = True  # CT/MR image storage instances are collected per series and upscaled as volumes
    stable_age: float = 60.0  # seconds without a new instance before a series is processed (Orthanc's StableAge)
    model: str | None = None  # through-plane model (name or weights file); None: medsr-mr-tp
    factor: float | None = None  # through-plane factor; None: the slice spacing over the in-plane spacing
    spacing: float | None = None  # or a target slice spacing in mm

    @property
    def sop_classes(self) -> tuple[str, ...]:
        return tuple(VOLUME_SOP_CLASSES) if self.enabled else ()


@dataclass(frozen=True)
class NodeConfig:
    listen: ListenConfig = field(default_factory=ListenConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    destination: DestinationConfig = field(default_factory=DestinationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log_level: str = "info"
    source: Path | None = None  # the TOML file
    volumes: VolumesConfig = field(default_factory=VolumesConfig)

    @property
    def accepted_sop_classes(self) -> tuple[str, ...]:
        """What the SCP accepts and the forwarder proposes: filters.sop_classes, plus CT/MR with [volumes]."""
        return tuple(dict.fromkeys((*self.filters.sop_classes, *self.volumes.sop_classes)))


# --------------------------------------------------------------------------------------- checking


class _Checker:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.errors: list[str] = []

    def fail(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def table(self, data: dict[str, Any], name: str, known: set[str]) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.fail(name, f"must be a table ([{name}]), got {_show(value)}")
            return {}
        for key in value:
            if key not in known:
                self.fail(f"{name}.{key}", f"unknown setting (known: {', '.join(sorted(known))})")
        return value

    def string(self, t: dict[str, Any], sect: str, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = t.get(key, default)
        if not isinstance(value, str):
            self.fail(f"{sect}.{key}", f"must be a string, got {_show(value)}")
            return default
        if choices and value not in choices:
            self.fail(f"{sect}.{key}", f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
            return default
        return value

    def integer(self, t: dict[str, Any], sect: str, key: str, default: int | None, lo: int, hi: int | None = None) -> Any:
        value = t.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            self.fail(f"{sect}.{key}", f"must be an integer {rng}, got {_show(value)}")
            return default
        return value

    def number(self, t: dict[str, Any], sect: str, key: str, default: float, lo: float, positive: bool = False,
               unit: str = "seconds") -> float:
        value = t.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (positive and value <= 0):
            self.fail(f"{sect}.{key}", f"must be a number {'> ' if positive else '>= '}{lo:g} ({unit}), got {_show(value)}")
            return default
        return float(value)

    def strings(self, t: dict[str, Any], sect: str, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = t.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(f"{sect}.{key}", f"must be a list of strings, got {_show(value)}")
            return default
        return tuple(value)

    def ae_title(self, value: str, where: str) -> str:
        v = value.strip()
        if not v or len(v) > 16 or "\\" in v or any(ord(c) < 32 or ord(c) > 126 for c in v):
            self.fail(where, f"not a valid AE title (1-16 printable ASCII characters, no backslash): {value!r}")
        return v

    def file(self, t: dict[str, Any], sect: str, key: str) -> Path | None:
        """An optional existing file (TLS material, secrets)."""
        if key not in t:
            return None
        value = self.string(t, sect, key, "")
        if not value:
            return None
        p = self.path(value)
        if not p.is_file():
            self.fail(f"{sect}.{key}", f"file not found: {p}")
        return p

    def model_name(self, name: str | None, where: str) -> str | None:
        """A registered model name, or a weights path resolved against the TOML's folder (checked)."""
        if isinstance(name, str) and ("/" in name or "\\" in name or Path(name).suffix):
            p = self.path(name)
            if not p.is_file():
                self.fail(where, f"weights file not found: {p}")
            return str(p)
        if isinstance(name, str):
            from medsr.weights.registry import MODELS, find_entry

            if find_entry(name) is None:
                self.fail(where, f"unknown model {name!r} (registered: {', '.join(sorted(MODELS))}; or a weights path)")
        return name

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_config(data: dict[str, Any], base: Path, source: Path | None = None) -> NodeConfig:
    """A :class:`NodeConfig` from parsed TOML; raises :class:`ConfigError` listing every problem."""
    c = _Checker(base)
    sections = {"listen", "filters", "destination", "model", "spool", "metrics", "log", "volumes"}
    for key in data:
        if key not in sections:
            c.fail(key, f"unknown section or setting (known sections: {', '.join(sorted(sections))})")

    # [listen]
    listen_keys = {"ae_title", "address", "port", "allowed_calling_aets", "peers", "max_associations",
                   "max_per_peer", "acse_timeout", "dimse_timeout", "network_timeout", "max_pdu_size",
                   "max_instance_mb", "min_free_mb", "tls_cert", "tls_key", "tls_ca"}
    t = c.table(data, "listen", listen_keys)
    d = ListenConfig()
    peers: dict[str, tuple[str, ...]] = {}
    raw_peers = t.get("peers", {})
    if not isinstance(raw_peers, dict):
        c.fail("listen.peers", f"must be a table of AE title = [addresses], got {_show(raw_peers)}")
        raw_peers = {}
    for aet, addrs in raw_peers.items():
        addrs = c.strings(raw_peers, "listen.peers", aet, ())
        for a in addrs:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                c.fail(f"listen.peers.{aet}", f"not an IP address or network: {a!r}")
        if not addrs:
            c.fail(f"listen.peers.{aet}", "must name at least one address")
        peers[c.ae_title(aet, "listen.peers")] = addrs
    listen = ListenConfig(
        ae_title=c.ae_title(c.string(t, "listen", "ae_title", d.ae_title), "listen.ae_title"),
        address=c.string(t, "listen", "address", d.address),
        port=c.integer(t, "listen", "port", d.port, 1, 65535),
        allowed_calling_aets=tuple(
            c.ae_title(a, "listen.allowed_calling_aets") for a in c.strings(t, "listen", "allowed_calling_aets", ())
        ),
        peers=peers,
        max_associations=c.integer(t, "listen", "max_associations", d.max_associations, 1, 1000),
        max_per_peer=c.integer(t, "listen", "max_per_peer", d.max_per_peer, 1, 1000),
        acse_timeout=c.number(t, "listen", "acse_timeout", d.acse_timeout, 0, positive=True),
        dimse_timeout=c.number(t, "listen", "dimse_timeout", d.dimse_timeout, 0, positive=True),
        network_timeout=c.number(t, "listen", "network_timeout", d.network_timeout, 0, positive=True),
        max_pdu_size=c.integer(t, "listen", "max_pdu_size", d.max_pdu_size, 4096, 16 * 1024 * 1024),
        max_instance_mb=c.number(t, "listen", "max_instance_mb", d.max_instance_mb, 0, positive=True),
        min_free_mb=c.number(t, "listen", "min_free_mb", d.min_free_mb, 0),
        tls_cert=c.file(t, "listen", "tls_cert"),
        tls_key=c.file(t, "listen", "tls_key"),
        tls_ca=c.file(t, "listen", "tls_ca"),
    )
    if "allowed_calling_aets" not in t:
        c.fail("listen.allowed_calling_aets", "required: the AE titles allowed to send (e.g. [\"ORTHANC\"])")
    elif not listen.allowed_calling_aets:
        c.fail("listen.allowed_calling_aets", "must name at least one AE title (anything else is rejected)")
    for aet in peers:
        if aet not in listen.allowed_calling_aets:
            c.fail("listen.peers", f"{aet!r} is not in listen.allowed_calling_aets")
    if (listen.tls_cert is None) != (listen.tls_key is None):
        c.fail("listen.tls_cert", "tls_cert and tls_key go together (TLS on the SCP)")
    if listen.tls_ca is not None and listen.tls_cert is None:
        c.fail("listen.tls_ca", "needs tls_cert and tls_key (mutual TLS is TLS plus client certificates)")

    # [filters]
    t = c.table(data, "filters", {"sop_classes", "modalities", "max_pixels", "on_mismatch"})
    f = FilterConfig()
    sop_classes = c.strings(t, "filters", "sop_classes", f.sop_classes)
    for uid in sop_classes:
        if not is_uid(uid):
            c.fail("filters.sop_classes", f"not a UID: {uid!r}")
    if not sop_classes:
        c.fail("filters.sop_classes", "must name at least one SOP class UID (or leave it out for the default list)")
    modalities = tuple(m.upper() for m in c.strings(t, "filters", "modalities", ()))
    for m in modalities:
        if not _MODALITY_RE.match(m):
            c.fail("filters.modalities", f"not a modality code (e.g. CR, DX): {m!r}")
    filters = FilterConfig(
        sop_classes=sop_classes,
        modalities=modalities,
        max_pixels=c.integer(t, "filters", "max_pixels", f.max_pixels, 1),
        on_mismatch=c.string(t, "filters", "on_mismatch", f.on_mismatch, ("refuse", "ignore")),
    )

    # [destination]
    t = c.table(data, "destination", {"type", "ae_title", "host", "port", "calling_ae_title", "url", "timeout", "syntax",
                                      "retry_for", "max_pdu_size", "tls_ca", "tls_cert", "tls_key", "tls_server_name",
                                      "token_file", "username", "password_file"})
    dd = DestinationConfig()
    if "destination" not in data:
        c.fail("destination", "required: where derived instances go ([destination] type = \"dicom\" or \"dicomweb\")")
    kind = c.string(t, "destination", "type", dd.kind, ("dicom", "dicomweb"))
    dest = DestinationConfig(
        kind=kind,
        ae_title=c.string(t, "destination", "ae_title", ""),
        host=c.string(t, "destination", "host", dd.host),
        port=c.integer(t, "destination", "port", dd.port, 1, 65535),
        calling_ae_title=c.string(t, "destination", "calling_ae_title", ""),
        url=c.string(t, "destination", "url", ""),
        timeout=c.number(t, "destination", "timeout", dd.timeout, 0, positive=True),
        syntax=c.string(t, "destination", "syntax", "") or None,
        retry_for=c.number(t, "destination", "retry_for", dd.retry_for, 0, positive=True),
        max_pdu_size=c.integer(t, "destination", "max_pdu_size", dd.max_pdu_size, 4096, 16 * 1024 * 1024),
        tls_ca=c.file(t, "destination", "tls_ca"),
        tls_cert=c.file(t, "destination", "tls_cert"),
        tls_key=c.file(t, "destination", "tls_key"),
        tls_server_name=c.string(t, "destination", "tls_server_name", ""),
        token_file=c.file(t, "destination", "token_file"),
        username=c.string(t, "destination", "username", ""),
        password_file=c.file(t, "destination", "password_file"),
    )
    if (dest.tls_cert is None) != (dest.tls_key is None):
        c.fail("destination.tls_cert", "tls_cert and tls_key go together (client certificate)")
    if dest.token_file is not None and dest.username:
        c.fail("destination.token_file", "give a token or a username/password, not both")
    if bool(dest.username) != (dest.password_file is not None):
        c.fail("destination.username", "username and password_file go together (HTTP basic auth)")
    if dest.syntax is not None:
        from medsr.io.dicom_derive import parse_syntax

        try:
            parse_syntax(dest.syntax)
        except ValueError as e:
            c.fail("destination.syntax", str(e))
    if "destination" in data:
        if kind == "dicom":
            if "ae_title" not in t:
                c.fail("destination.ae_title", "required for type = \"dicom\" (the called AE title)")
            else:
                c.ae_title(dest.ae_title, "destination.ae_title")
            if "port" not in t:
                c.fail("destination.port", "required for type = \"dicom\"")
            if "url" in t:
                c.fail("destination.url", "only for type = \"dicomweb\"")
        else:
            if not re.match(r"^https?://[^/\s]+", dest.url):
                c.fail("destination.url", f"required for type = \"dicomweb\": an http(s):// URL, got {dest.url!r}")
            for key in ("ae_title", "port", "calling_ae_title", "tls_server_name", "max_pdu_size"):
                if key in t:
                    c.fail(f"destination.{key}", "only for type = \"dicom\"")
    if dest.calling_ae_title:
        c.ae_title(dest.calling_ae_title, "destination.calling_ae_title")

    # [model]
    t = c.table(data, "model", {"name", "engine", "devices", "precision", "tile", "overlap", "batch", "threads",
                                "uid_root"})
    m = ModelConfig()
    name = t.get("name")
    if name is not None and not (isinstance(name, str) and name):
        c.fail("model.name", f"must be a model name or weights path, got {_show(name)}")
        name = None
    engine = None
    if "engine" in t:
        e = c.string(t, "model", "engine", "")
        engine = c.path(e) if e else None
        if name is not None:
            c.fail("model", "give either name (weights) or engine, not both")
        elif engine is not None and not engine.is_file():
            c.fail("model.engine", f"file not found: {engine}")
    name = c.model_name(name, "model.name")
    devices = c.strings(t, "model", "devices", m.devices)
    if not devices:
        c.fail("model.devices", "must name at least one device (e.g. [\"cpu\"] or [\"cuda:0\", \"cuda:1\"])")
    for dev in devices:
        if not re.match(r"^(cpu|auto|cuda(:\d+)?)$", dev):
            c.fail("model.devices", f"not a device: {dev!r} (cpu, auto, cuda or cuda:N)")
    model = ModelConfig(
        name=name,
        engine=engine,
        devices=devices,
        precision=c.string(t, "model", "precision", "fp32", ("fp32", "tf32", "fp16", "bf16")) if "precision" in t else None,
        tile=c.integer(t, "model", "tile", None, 8),
        overlap=c.integer(t, "model", "overlap", None, 0),
        batch=c.integer(t, "model", "batch", None, 1),
        threads=c.integer(t, "model", "threads", None, 1),
        uid_root=c.string(t, "model", "uid_root", "") or None,
    )
    if model.uid_root is not None and not (is_uid(model.uid_root.rstrip(".")) and len(model.uid_root.rstrip(".")) <= 30):
        c.fail("model.uid_root", f"must be a UID root of at most 30 characters (e.g. \"1.2.826.0.1.3680043.10.999\"), "
                                 f"got {model.uid_root!r}")

    # [spool]
    t = c.table(data, "spool", {"path", "max_attempts", "backoff_initial", "backoff_max", "forwarders",
                                "keep_delivered_days"})
    s = SpoolConfig()
    if "path" not in t:
        c.fail("spool.path", "required: a folder for the durable queue (e.g. \"/var/spool/medsr-node\")")
    spool_path = c.string(t, "spool", "path", "")
    spool = SpoolConfig(
        path=c.path(spool_path) if spool_path else s.path,
        max_attempts=c.integer(t, "spool", "max_attempts", s.max_attempts, 1),
        backoff_initial=c.number(t, "spool", "backoff_initial", s.backoff_initial, 0, positive=True),
        backoff_max=c.number(t, "spool", "backoff_max", s.backoff_max, 0, positive=True),
        forwarders=c.integer(t, "spool", "forwarders", s.forwarders, 1, 64),
        keep_delivered_days=c.number(t, "spool", "keep_delivered_days", s.keep_delivered_days, 0),
    )
    if spool.backoff_max < spool.backoff_initial:
        c.fail("spool.backoff_max", "must be >= spool.backoff_initial")

    # [metrics], [log]
    t = c.table(data, "metrics", {"address", "port", "status_interval"})
    mc = MetricsConfig()
    metrics = MetricsConfig(
        address=c.string(t, "metrics", "address", mc.address),
        port=c.integer(t, "metrics", "port", mc.port, 0, 65535),
        status_interval=c.number(t, "metrics", "status_interval", mc.status_interval, 0),
    )
    t = c.table(data, "log", {"level"})
    level = c.string(t, "log", "level", "info", ("debug", "info", "warning", "error"))

    # [volumes]
    t = c.table(data, "volumes", {"enabled", "stable_age", "model", "factor", "spacing"})
    v = VolumesConfig()
    enabled = t.get("enabled", v.enabled)
    if not isinstance(enabled, bool):
        c.fail("volumes.enabled", f"must be true or false, got {_show(enabled)}")
        enabled = v.enabled
    vmodel = t.get("model")
    if vmodel is not None and not (isinstance(vmodel, str) and vmodel):
        c.fail("volumes.model", f"must be a model name or weights path, got {_show(vmodel)}")
        vmodel = None
    factor = spacing = None
    if "factor" in t:
        factor = c.number(t, "volumes", "factor", 2.0, 1.0, unit="through-plane factor")
        if factor > 8:
            c.fail("volumes.factor", f"must be at most 8 (the through-plane models are trained for 2-4), got {factor:g}")
    if "spacing" in t:
        spacing = c.number(t, "volumes", "spacing", 1.0, 0, positive=True, unit="mm")
    if factor is not None and spacing is not None:
        c.fail("volumes", "give factor or spacing, not both")
    volumes = VolumesConfig(
        enabled=enabled,
        stable_age=c.number(t, "volumes", "stable_age", v.stable_age, 0, positive=True),
        model=c.model_name(vmodel, "volumes.model"),
        factor=factor,
        spacing=spacing,
    )

    if listen.port == metrics.port and listen.address == metrics.address and metrics.port:
        c.fail("metrics.port", "is the DICOM listen port")
    if c.errors:
        where = str(source) if source else "config"
        raise ConfigError(f"{where}: {len(c.errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in c.errors))
    return NodeConfig(listen, filters, dest, model, spool, metrics, level, source, volumes)


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate a medsr-node TOML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file ({type(e).__name__}: {e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(data, p.resolve().parent, p)
