"""medsr: optimized super-resolution for medical images.

Heavy modules (torch, onnxruntime, TensorRT, pydicom) are imported lazily so that
``import medsr`` and the CLIs start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from medsr.api import Upscaler
    from medsr.volumes import read_volume

__all__ = ["Upscaler", "__version__", "read_volume"]


def __getattr__(name: str) -> Any:
    if name == "Upscaler":
        from medsr.api import Upscaler

        return Upscaler
    if name == "read_volume":
        from medsr.volumes import read_volume

        return read_volume
    raise AttributeError(f"module 'medsr' has no attribute {name!r}")
