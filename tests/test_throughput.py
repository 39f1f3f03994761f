"""Issue 24: what ran (describe, summary line, precision refusals), the OpenVINO compiled-model cache, int8,
the GPU script's dry run and the overlapped pipeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_rrdb

from medsr.api import Upscaler
from medsr.runtime.backend import BackendError

HAS_OV = importlib.util.find_spec("openvino") is not None


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    p = tmp_path / "tiny_x4.pth"
    torch.save({"params_ema": tiny_rrdb(4, 3).state_dict()}, p)
    return p


# ------------------------------------------------------------------------------------------ what ran


def test_describe_and_repr_name_runtime_precision_device_model_tiles(weights: Path) -> None:
    up = Upscaler.load(str(weights), runtime="torch", device="cpu", tile=32, overlap=8)
    d = up.describe()
    assert d.startswith("torch fp32 on cpu, model tiny_x4 x4 3ch")
    assert "tile 32 overlap 8 halo 2 batch 1" in d
    assert repr(up) == f"<Upscaler {d}>"


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
def test_auto_choice_is_named(weights: Path) -> None:
    from medsr.runtime.openvino_backend import native_bf16

    up = Upscaler.load(str(weights), device="cpu")
    want = "bf16 on cpu (auto: native bf16)" if native_bf16() else "fp32 on cpu (auto: no native bf16)"
    assert up.describe().startswith(f"openvino {want}"), up.describe()
    # an explicit precision is not an automatic choice
    assert "auto" not in Upscaler.load(str(weights), device="cpu", precision="fp32").describe()


@pytest.mark.skipif(not HAS_OV, reason="openvino not installed")
@pytest.mark.parametrize("native", [True, False])
def test_machine_precisions_follow_the_cpu(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsr.runtime import openvino_backend
    from medsr.runtime.engines import check_machine_precision, machine_precisions

    monkeypatch.setattr(openvino_backend, "native_bf16", lambda: native)
    can = machine_precisions("auto", "cpu")
    assert can[0] == "fp32" and ("bf16" in can) == native and "fp16" not in can and "tf32" not in can
    assert machine_precisions("torch", "cpu") == ("fp32", "bf16")
    for asked in ("fp16", "tf32") + (() if native else ("bf16",)):
        with pytest.raises(BackendError) as e:
            check_machine_precision("auto", "cpu", asked)
        suggested = str(e.value).split("this machine can run: ")[1]
        assert suggested == ", ".join(can)  # only what this machine runs
    check_machine_precision("auto", "cpu", "fp32")


def test_cli_names_what_ran_in_log_and_summary(weights: Path, tmp_path: Path) -> None:
    import cv2

    from medsr.cli.infer import main

    src = tmp_path / "in.png"
    cv2.imwrite(str(src), (np.random.default_rng(0).random((20, 24)) * 65535).astype(np.uint16))
    res = CliRunner().invoke(main, ["--quiet", "--device", "cpu", "--runtime", "torch", "--tile", "16",
                                    "--overlap", "4", "--model", str(weights), str(src), "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    ran = "torch fp32 on cpu, model tiny_x4 x4 3ch, tile 16 overlap 4 halo 1 batch 1"
    assert f"medsr-infer: running {ran}" in res.output
    summary = [ln for ln in res.output.splitlines() if "1 written" in ln]
    assert summary and summary[0].endswith(f"; ran {ran}")


def test_cli_precision_refusal_suggests_only_this_machine(weights: Path, tmp_path: Path) -> None:
    from medsr.cli.infer import main
    from medsr.runtime.engines import machine_precisions

    src = tmp_path / "in.png"
    import cv2

    cv2.imwrite(str(src), np.zeros((8, 8), np.uint8))
    res = CliRunner().invoke(main, ["--quiet", "--device", "cpu", "--precision", "fp16", "--model", str(weights),
                                    str(src), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert f"this machine can run: {', '.join(machine_precisions('auto', 'cpu'))}" in res.output
