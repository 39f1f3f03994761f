"""The one small interface every inference backend implements (PyTorch, ONNX Runtime, OpenVINO, TensorRT,
the Triton client)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from medsr.arch.descriptor import ModelDescriptor


class BackendError(RuntimeError):
    """A backend could not be created or could not run (message says why and what to do)."""


class NonFiniteOutputError(BackendError):
    """A tile produced NaN/Inf (typically fp16 overflow)."""


@dataclass(frozen=True)
class TileLimits:
    """LR tile shapes (halo included) a backend accepts. An engine's optimization profile maps here."""

    min_hw: tuple[int, int] = (1, 1)
    max_hw: tuple[int, int] | None = None  # None: no upper limit
    max_batch: int | None = None
    multiple: int = 1

    def accepts(self, h: int, w: int) -> bool:
        if h % self.multiple or w % self.multiple:
            return False
        if h < self.min_hw[0] or w < self.min_hw[1]:
            return False
        return self.max_hw is None or (h <= self.max_hw[0] and w <= self.max_hw[1])


class Backend(ABC):
    """``run(batch[N,C,h,w] float32 in [0,1] on self.device) -> [N,C,h*s,w*s] float32``.

    Implementations may compute in lower precision internally; they return float32 on ``device``.
    Non-finite values must not be hidden (e.g. by clamping Inf to 1): the tiled runtime checks every
    tile and re-runs bad ones on :meth:`fallback`. Backends are not thread-safe: use one per thread,
    or serialise calls with a lock (``medsr.Upscaler`` does).
    """

    name: str = "backend"
    descriptor: ModelDescriptor
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    preferred_batch: int = 1
    #: what produced the weights: the registry name / stored id, and the weights file's sha256 ("" if unknown)
    model_id: str = "custom"
    weights_sha256: str = ""

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    @property
    def channels(self) -> int:
        return self.descriptor.in_channels

    def tile_limits(self) -> TileLimits:
        return TileLimits(multiple=self.descriptor.size_multiple)

    @abstractmethod
    def run(self, batch: torch.Tensor) -> torch.Tensor: ...

    def fallback(self) -> Backend | None:
        """A higher-precision backend to re-run a tile whose output is not finite, if any."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` checked.

    Raises :class:`BackendError` for unknown names or a CUDA device that is not available.
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise BackendError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"device {device!r} is not supported: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(
                f"device {device!r} requested but CUDA is not available (no GPU, or a CPU-only torch build); "
                "use device='cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev
