"""Counters and gauges (prometheus-client, one registry per node) and the status line."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

WINDOW_S = 60.0


class Metrics:
    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter("medsr_node_received", "Instances received and spooled", registry=r)
        self.rejected = Counter(
            "medsr_node_rejected", "Instances or associations refused at the door", ["reason"], registry=r
        )
        self.ignored = Counter("medsr_node_ignored", "Instances acknowledged and dropped (filters, loops)", registry=r)
        self.done = Counter("medsr_node_done", "Derived instances forwarded", registry=r)
        self.failed = Counter("medsr_node_failed", "Instances dead-lettered", ["stage"], registry=r)
        self.retries = Counter("medsr_node_retries", "Forward or upscale attempts that will be retried", registry=r)
        self.lr_megapixels = Counter("medsr_node_lr_megapixels", "Low-resolution megapixels upscaled", registry=r)
        self.upscale_seconds = Counter("medsr_node_upscale_seconds", "Time spent upscaling", registry=r)
        self.queue_depth = Gauge("medsr_node_queue_depth", "Instances waiting in the spool", ["stage"], registry=r)
        self.mp_per_s = Gauge(
            "medsr_node_lr_megapixels_per_second", f"LR megapixels upscaled per second over the last {WINDOW_S:g} s",
            registry=r,
        )
        self.destination_up = Gauge("medsr_node_destination_up", "1 when the last forward reached the destination",
                                    registry=r)
        self.healthy = Gauge("medsr_node_healthy", "1 while every worker's engine works (0: restart the node)",
                             registry=r)
        self.dest_up = True
        self.destination_up.set(1)
        self._window: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.mp_per_s.set_function(self.rate)

    def set_destination(self, up: bool) -> bool:
        """Record the destination state; True when it changed."""
        changed = up != self.dest_up
        self.dest_up = up
        self.destination_up.set(1 if up else 0)
        return changed

    def track_depth(self, stage: str, fn: Callable[[], float]) -> None:
        self.queue_depth.labels(stage).set_function(fn)

    def upscaled(self, megapixels: float, seconds: float) -> None:
        self.lr_megapixels.inc(megapixels)
        self.upscale_seconds.inc(seconds)
        now = time.monotonic()
        with self._lock:
            self._window.append((now, megapixels))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._window and self._window[0][0] < now - WINDOW_S:
            self._window.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            total = sum(mp for _, mp in self._window)
        return total / max(1e-9, min(WINDOW_S, now - self._t0))

    @staticmethod
    def value(counter: Any) -> float:
        """Total of a counter over all its labels."""
        return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))

    def status_line(self) -> str:
        depth = {
            s.labels["stage"]: int(s.value) for m in self.queue_depth.collect() for s in m.samples
        }
        return (
            f"received {self.value(self.received):.0f}, done {self.value(self.done):.0f}, "
            f"failed {self.value(self.failed):.0f}, rejected {self.value(self.rejected):.0f}, "
            f"ignored {self.value(self.ignored):.0f}; queue upscale {depth.get('upscale', 0)}, "
            f"forward {depth.get('forward', 0)}; LR {self.rate():.4f} MP/s; "
            f"destination {'up' if self.dest_up else 'DOWN'}"
        )
