"""Python runtime API for PACS integrations and scripts.

>>> from medsr import Upscaler
>>> up = Upscaler.from_pretrained("realesrgan-x4plus")       # PyTorch, CPU or CUDA
>>> hr = up(lr_uint16)                                         # numpy in, numpy out, same dtype
>>> up.upscale_file("in.dcm", "out/in.dcm")                   # format and bit depth kept
>>> derived = up.upscale_dicom(pydicom.dcmread("in.dcm"))     # a derived FileDataset (save_as -> Part 10)

Thread safety: one Upscaler may be shared between threads; calls are serialised by a lock (one
backend = one device queue). For parallel throughput use one Upscaler per thread/GPU.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsr.io.image import DEFAULT_MAX_PIXELS
from medsr.runtime.adapters import GrayViaRGB, PerChannel
from medsr.runtime.backend import Backend

if TYPE_CHECKING:  # pragma: no cover
    from medsr.io import Image
    from medsr.runtime import TileConfig, TilePlan

_INT_MAX = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


class Upscaler:
    """Upscales whole images through the tiled runtime on one backend.

    ``backend`` serves the model's native channel count; gray and RGB inputs are adapted
    (exact gray fold for PyTorch models, replicate/average or per-channel for fixed engines).
    """

    def __init__(
        self,
        backend: Backend,
        config: TileConfig | None = None,
        *,
        model_id: str = "custom",
        variants: dict[int, Backend] | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        from medsr.runtime import TileConfig

        self.backend = backend
        self.config = config or TileConfig()
        self.model_id = model_id
        #: sha256 of the weights (derived DICOM UIDs depend on it; None: on ``model_id`` only)
        self.weights_sha256 = weights_sha256
        self._variants: dict[int, Backend] = {backend.channels: backend, **(variants or {})}
        self._lock = threading.Lock()

    # construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        precision: str = "fp32",
        tile: int | None = None,
        overlap: int | None = None,
        batch: int | None = None,
        channels_last: bool = True,
        compile: bool = False,
    ) -> Upscaler:
        """A registered model name or a weights file (.pth/.safetensors/ncnn .param), on PyTorch.

        ``None`` takes medsr's default, the shipped chest X-ray fidelity model (``medsr.weights.DEFAULT_MODEL``).
        """
        from medsr.arch import fold_to_gray
        from medsr.runtime import TorchBackend
        from medsr.weights import DEFAULT_MODEL, load_model

        lm = load_model(DEFAULT_MODEL if name_or_path is None else name_or_path)

        def make(model: Any) -> Backend:
            return TorchBackend(model, device=device, precision=precision, channels_last=channels_last, compile=compile)

        backend = make(lm.model)
        variants: dict[int, Backend] = {}
        if lm.descriptor.in_channels == 3:
            variants[1] = make(fold_to_gray(lm.model))
        config = _config(backend, tile, overlap, batch)
        return cls(backend, config, model_id=lm.model_id, variants=variants, weights_sha256=lm.sha256)

    @classmethod
    def from_engine(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        precision: str = "fp32",
        tile: int | None = None,
        overlap: int | None = None,
        batch: int | None = None,
        compile: bool = False,
    ) -> Upscaler:
        """A built engine or model file: .plan/.engine (TensorRT), .onnx (ONNX Runtime), or weights."""
        p = Path(path)
        if p.suffix.lower() in {".pth", ".pt", ".safetensors", ".param"}:
            return cls.from_pretrained(
                p, device=device, precision=precision, tile=tile, overlap=overlap, batch=batch, compile=compile
            )
        from medsr.runtime.engines import open_backend

        backend = open_backend(p, device=device, precision=precision)
        model_id = getattr(backend, "model_id", None) or p.stem
        return cls(backend, _config(backend, tile, overlap, batch), model_id=model_id,
                   weights_sha256=_recorded_weights_sha256(backend, p))

    # properties ------------------------------------------------------------------------------
    @property
    def scale(self) -> int:
        return self.backend.scale

    def backend_for(self, channels: int) -> Backend:
        """The backend that serves ``channels``-channel images (created on first use)."""
        b = self._variants.get(channels)
        if b is None:
            if channels not in (1, 3):
                raise ValueError(f"images must have 1 or 3 channels, got {channels}")
            b = GrayViaRGB(self.backend) if channels == 1 else PerChannel(self.backend, channels)
            self._variants[channels] = b
        return b

    def plan(self, height: int, width: int, channels: int = 1) -> TilePlan:
        """The tile plan an ``height x width`` image will run with (tile count, shapes, overhead)."""
        from medsr.runtime import plan_tiles

        return plan_tiles(height, width, self.config, self.backend_for(channels).tile_limits())

    # numpy -----------------------------------------------------------------------------------
    def __call__(self, array: np.ndarray, *, on_tiles: Any = None) -> np.ndarray:
        """Upscale a numpy image: uint8/uint16 (full range) or float in [0, 1]; H x W or H x W x C.

        Returns the same dtype (float inputs give float32) and layout, ``scale`` times larger.
        """
        from medsr.runtime import upscale_array

        arr = np.asarray(array)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
            raise ValueError(f"expected an H x W or H x W x C (C = 1 or 3) image, got shape {arr.shape}")
        if arr.dtype in _INT_MAX:
            peak = _INT_MAX[arr.dtype]
            x = arr.astype(np.float32) / peak
            out_dtype = arr.dtype

            def convert(strip: np.ndarray) -> np.ndarray:
                return np.clip(np.rint(strip * peak), 0, peak).astype(out_dtype)
        elif np.issubdtype(arr.dtype, np.floating):
            x = arr.astype(np.float32, copy=False)
            if not np.isfinite(x).all():
                raise ValueError("float image holds NaN or Inf values; give finite values in [0, 1]")
            lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
            if lo < 0.0 or hi > 1.0:
                raise ValueError(
                    f"float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]: divide by the full scale "
                    "(e.g. x / 255 or x / 65535), or pass the uint8/uint16 array itself"
                )
            out_dtype = np.dtype(np.float32)
            convert = None
        else:
            raise ValueError(f"unsupported dtype {arr.dtype}: use uint8, uint16 or float in [0, 1]")
        hwc = x if x.ndim == 3 else x[..., None]
        s = self.scale
        out = np.empty((hwc.shape[0] * s, hwc.shape[1] * s, hwc.shape[2]), dtype=out_dtype)
        with self._lock:
            upscale_array(self.backend_for(hwc.shape[2]), hwc, self.config, out=out, convert=convert, on_tiles=on_tiles)
        return out if arr.ndim == 3 else out[..., 0]

    # medsr.io images ---------------------------------------------------------------------------
    def upscale_image(self, img: Image, *, on_tiles: Any = None, dicom_syntax: str | None = None) -> Image:
        """Upscale an :class:`medsr.io.Image`, keeping format, bit depth and photometric.

        DICOM: a derived instance encoded in ``dicom_syntax`` (default JPEG 2000 lossless; see
        ``medsr.io.dicom_derive.parse_syntax``); multi-frame images are upscaled frame by frame."""
        from medsr.io import make_output

        if img.frames > 1:
            from medsr.io.dicom_derive import derive_frames

            return derive_frames(img, lambda f: self._upscale_stored(f, on_tiles), self.scale, self.model_id,
                                 weights_sha256=self.weights_sha256, syntax=dicom_syntax)
        out = self._upscale_stored(img, on_tiles)
        return make_output(img, out, self.scale, self.model_id, weights_sha256=self.weights_sha256,
                           dicom_syntax=dicom_syntax)

    def _upscale_stored(self, img: Image, on_tiles: Any) -> np.ndarray:
        from medsr.io import float_to_stored, to_float
        from medsr.runtime import upscale_array

        x = to_float(img)
        s = self.scale
        shape = (img.height * s, img.width * s) + ((img.channels,) if img.pixels.ndim == 3 else ())
        out = np.empty(shape, dtype=img.pixels.dtype)
        with self._lock:
            upscale_array(
                self.backend_for(x.shape[2]),
                x,
                self.config,
                out=out,
                convert=lambda strip: float_to_stored(strip, img),
                on_tiles=on_tiles,
            )
        return out

    def upscale_file(
        self, src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False, on_tiles: Any = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS, dicom_syntax: str | None = None,
    ) -> Path:
        """Read ``src``, upscale, write ``dst`` atomically in the same format and bit depth.

        Inputs above ``max_pixels`` LR pixels (from the header, before decoding) are refused.
        """
        from medsr.io import read_image, write_image

        src, dst = Path(src), Path(dst)
        if dst.exists() and dst.resolve() == src.resolve():
            raise ValueError(f"{dst}: refusing to write over the input file")
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst}: output exists (pass overwrite=True to replace it)")
        img = read_image(src, max_pixels=max_pixels)
        return write_image(self.upscale_image(img, on_tiles=on_tiles, dicom_syntax=dicom_syntax), dst)

    def upscale_dicom(self, ds: Any, *, dicom_syntax: str | None = None) -> Any:
        """Upscale a pydicom Dataset; returns the derived ``FileDataset`` (new UIDs, spacing / scale,
        file meta): ``save_as(path)`` writes a valid Part 10 file."""
        from medsr.io.dicom import image_from_dataset

        return self.upscale_image(image_from_dataset(ds), dicom_syntax=dicom_syntax).dataset


def _recorded_weights_sha256(backend: Backend, path: Path) -> str | None:
    """The weights' sha256 an engine records (ONNX metadata, TensorRT sidecar), else the sha256 of
    the engine file itself (the same file always gives the same pixels)."""
    from medsr.weights import sha256_file

    for rec in (getattr(backend, "metadata", None), getattr(backend, "sidecar", None)):
        if isinstance(rec, dict) and rec.get("weights_sha256"):
            return str(rec["weights_sha256"])
    return sha256_file(path) if path.is_file() else None


def _config(backend: Backend, tile: int | None, overlap: int | None, batch: int | None) -> TileConfig:
    from medsr.runtime import TileConfig

    d = TileConfig()
    return TileConfig(
        tile=tile if tile is not None else d.tile,
        overlap=overlap if overlap is not None else d.overlap,
        batch=batch if batch is not None else backend.preferred_batch,
    )
