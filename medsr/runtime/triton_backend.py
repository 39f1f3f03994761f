"""Triton Inference Server backend: a client. Tiling and blending stay in the runtime; each ``run(batch)``
sends its tiles as one batched request to a model served by Triton, over gRPC or HTTP (tritonclient).

What the served model is comes from the server, not from a local file: its model configuration (read once
at start) gives the tensor names, datatypes, dims, ``max_batch_size`` and dynamic-batching sizes, and its
``parameters`` carry the medsr metadata (scale, channels, precision, model id, weights sha256) that
``medsr-export --triton`` writes (:func:`medsr.runtime.contract.triton_parameters`). A model whose I/O does
not match the engine contract is refused with an error naming the URL and the model; an unreachable server
is a BackendError, not a traceback.

URLs: ``grpc://host:8001`` (also a bare ``host:port``), ``http://host:8000``, ``https://host``. One client
per thread (tritonclient's HTTP client is gevent-based and must stay in the thread that made it).
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from medsr.runtime.backend import Backend, BackendError, TileLimits
from medsr.runtime.contract import (
    INPUT_NAME,
    OUTPUT_NAME,
    TRITON_DATATYPES,
    descriptor_from_metadata,
    finish_output,
    metadata_from_map,
)

DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "https": 443}
#: seconds for one request (a batch of tiles) and for the start-up checks
DEFAULT_TIMEOUT_S = 120.0
_NP = {dt: np.dtype(name) for name, dt in TRITON_DATATYPES.items()}  # "FP32" -> float32


def parse_url(url: str) -> tuple[str, str, bool]:
    """``(protocol, "host:port", ssl)`` of a Triton URL; a bare ``host:port`` is gRPC."""
    raw = url.strip()
    parts = urlsplit(raw if "://" in raw else f"grpc://{raw}")
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise BackendError(
            f"Triton URL {url!r}: use grpc://HOST:8001, http://HOST:8000, https://HOST or HOST:PORT (gRPC)"
        )
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as e:
        raise BackendError(f"Triton URL {url!r}: {e}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return ("grpc" if scheme == "grpc" else "http"), f"{host}:{port}", scheme == "https"


def _client_module(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
    except ImportError as e:
        raise BackendError(
            f"the Triton backend needs tritonclient ({protocol}): pip install 'medsr[triton]' ({e})"
        ) from None
    return mod


def _reason(e: BaseException) -> str:
    msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return " ".join(str(msg or type(e).__name__).split())


class TritonBackend(Backend):
    name = "triton"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        version: str | int = "",
        batch: int | None = None,
        expect_scale: int | None = None,
        precision: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.model = model
        self.version = str(version or "")
        self.timeout_s = float(timeout_s)
        self.protocol, self._address, self._ssl = parse_url(url)
        self._mod = _client_module(self.protocol)
        self.where = f"Triton {url} model {model!r}" + (f" version {self.version}" if self.version else "")
        self.device = torch.device("cpu")  # results come back to this host
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        client = self._client()
        try:
            live = client.is_server_live(**self._timeout_kw())
        except Exception as e:  # connection refused, DNS, TLS, timeout
            raise BackendError(
                f"{self.where}: the server is not reachable ({_reason(e)}); start it (docs/scale.md) or check the "
                f"URL ({self.protocol}; Triton's default ports: gRPC 8001, HTTP 8000)"
            ) from None
        if not live:
            raise BackendError(f"{self.where}: the server answers but is not live")
        if not self._call(client.is_model_ready, model, self.version):
            raise BackendError(f"{self.where}: not ready on the server; models there: {self._models(client)}")
        self.config = self._model_config(client)
        self._check_config(self.config, expect_scale, precision)
        if batch is not None and batch < 1:
            raise BackendError(f"batch must be >= 1, got {batch}")
        self.preferred_batch = min(batch or self._default_batch(), self.max_batch_size)

    # ------------------------------------------------------------------ server side
    def _timeout_kw(self) -> dict[str, float]:
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            if self.protocol == "grpc":
                c = self._mod.InferenceServerClient(url=self._address, ssl=self._ssl)
            else:
                c = self._mod.InferenceServerClient(url=self._address, ssl=self._ssl, connection_timeout=self.timeout_s,
                                                    network_timeout=self.timeout_s)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw, **self._timeout_kw())
        except Exception as e:
            raise BackendError(f"{self.where}: {_reason(e)}") from None

    def _models(self, client: Any) -> str:
        try:
            index = client.get_model_repository_index(as_json=True, **self._timeout_kw()) if self.protocol == "grpc" \
                else client.get_model_repository_index()
        except Exception as e:
            return f"(cannot list them: {_reason(e)})"
        rows = index.get("models", []) if isinstance(index, dict) else index
        names = [f"{m.get('name')} ({m.get('state', '?')})" for m in rows]
        return ", ".join(names) or "none"

    def _model_config(self, client: Any) -> dict[str, Any]:
        if self.protocol == "grpc":
            return self._call(client.get_model_config, self.model, self.version, as_json=True).get("config", {})
        return self._call(client.get_model_config, self.model, self.version)

    def _check_config(self, cfg: dict[str, Any], expect_scale: int | None, precision: str | None) -> None:
        """Learn the model from its configuration; BackendError when it does not follow the engine contract."""
        w = self.where
        params = {k: (v or {}).get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        meta = metadata_from_map(params)
        if "descriptor" not in meta:
            raise BackendError(
                f"{w}: its model configuration has no medsr.* parameters (scale, channels, model id); write the "
                "repository with medsr-export --triton REPO (or copy its parameters block into config.pbtxt)"
            )
        self.metadata = meta
        self.descriptor = descriptor_from_metadata(meta, w)
        self.model_id = meta.get("model_id", self.model)
        self.weights_sha256 = meta.get("weights_sha256", "")
        self.precision = meta.get("precision", "fp32")
        self.max_batch_size = int(cfg.get("max_batch_size") or 0)
        if self.max_batch_size < 1:
            raise BackendError(
                f"{w}: max_batch_size is {self.max_batch_size}; medsr sends tiles as batches along Triton's implicit "
                "batch dimension, so the model needs max_batch_size >= 1 (medsr-export --triton writes 8)"
            )
        ins = {t.get("name"): t for t in cfg.get("input") or []}
        outs = {t.get("name"): t for t in cfg.get("output") or []}
        if set(ins) != {INPUT_NAME} or OUTPUT_NAME not in outs:
            raise BackendError(
                f"{w}: expected one input {INPUT_NAME!r} and an output {OUTPUT_NAME!r} (the medsr engine contract), "
                f"the server has inputs {sorted(ins)} and outputs {sorted(outs)}"
            )
        self._in_dt, in_dims = self._tensor(ins[INPUT_NAME], "input")
        self._out_dt, out_dims = self._tensor(outs[OUTPUT_NAME], "output")
        d = self.descriptor
        if in_dims[0] != d.in_channels or out_dims[0] != d.out_channels:
            raise BackendError(
                f"{w}: dims {in_dims} -> {out_dims} do not match its medsr metadata ({d.in_channels} -> "
                f"{d.out_channels} channels, x{d.scale}); re-export the repository with medsr-export --triton"
            )
        hw = in_dims[1:]
        m = d.size_multiple
        if -1 in hw:
            self._limits = TileLimits(max_batch=self.max_batch_size, multiple=m)
        else:  # a static engine: every tile has exactly this shape (use TileConfig(fit=False))
            self._limits = TileLimits(min_hw=(hw[0], hw[1]), max_hw=(hw[0], hw[1]), max_batch=self.max_batch_size,
                                      multiple=m)
        if expect_scale is not None and int(expect_scale) != d.scale:
            raise BackendError(f"{w}: the model is x{d.scale} ({self.model_id}) but x{expect_scale} was requested")
        if precision is not None and precision != self.precision:
            raise BackendError(
                f"{w}: the served model is {self.precision}, not {precision}; the server's model sets the precision "
                f"(serve a {precision} export, or leave the precision unset)"
            )
        self._batch_sizes = [int(b) for b in (cfg.get("dynamic_batching") or {}).get("preferred_batch_size", [])]

    def _tensor(self, t: dict[str, Any], what: str) -> tuple[str, list[int]]:
        dt = str(t.get("data_type", "")).removeprefix("TYPE_")
        if dt not in _NP:
            raise BackendError(f"{self.where}: {what} datatype {t.get('data_type')} is not one of "
                               f"{', '.join('TYPE_' + k for k in _NP)}")
        dims = [int(v) for v in t.get("dims") or []]
        if "reshape" in t or len(dims) != 3:
            raise BackendError(f"{self.where}: {what} dims {dims} are not [C, H, W] (batch implicit)")
        return dt, dims

    def _default_batch(self) -> int:
        """The largest preferred batch of the server's dynamic batcher, else its max_batch_size."""
        sizes = [b for b in self._batch_sizes if 1 <= b <= self.max_batch_size]
        return max(sizes) if sizes else self.max_batch_size

    # ------------------------------------------------------------------ Backend
    def tile_limits(self) -> TileLimits:
        return self._limits

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != self.channels:
            raise BackendError(f"{self.where}: expected [N,{self.channels},h,w], got {tuple(batch.shape)}")
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy().astype(_NP[self._in_dt], copy=False)
        parts = [self._infer(x[i : i + self.max_batch_size]) for i in range(0, x.shape[0], self.max_batch_size)]
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        y = np.require(y, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])  # tritonclient's arrays are read-only views
        return finish_output(torch.from_numpy(y)).to(batch.device)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        mod = self._mod
        inp = mod.InferInput(INPUT_NAME, list(x.shape), self._in_dt)
        out = mod.InferRequestedOutput(OUTPUT_NAME)
        if self.protocol == "grpc":
            inp.set_data_from_numpy(x)
            res = self._call(self._client().infer, self.model, [inp], model_version=self.version, outputs=[out])
        else:
            inp.set_data_from_numpy(x, binary_data=True)
            try:
                res = self._client().infer(self.model, [inp], model_version=self.version, outputs=[out])
            except Exception as e:
                raise BackendError(f"{self.where}: {_reason(e)}") from None
        y = res.as_numpy(OUTPUT_NAME)
        if y is None:
            raise BackendError(f"{self.where}: the response has no {OUTPUT_NAME!r} tensor")
        return y

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001, S110 - closing a dead connection
                pass
        self._local = threading.local()
