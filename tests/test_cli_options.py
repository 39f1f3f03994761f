"""The argument groups every medsr-* CLI shares (medsr/cli/options.py): one spelling, one choice list."""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from medsr.cli import options

pytestmark = pytest.mark.quick

CLIS = ("infer", "export", "train", "eval", "bench", "node")


def _main(name: str) -> click.Command:
    return importlib.import_module(f"medsr.cli.{name}").main


def _help(name: str) -> str:
    res = CliRunner().invoke(_main(name), ["--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


def _names(name: str) -> set[str]:
    return {o for p in _main(name).params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}


@pytest.mark.parametrize("name", CLIS)
def test_logging_group_everywhere(name: str) -> None:
    h = _help(name)
    assert "-q, --quiet" in h and "-v, --verbose" in h and "--log-format [text|json]" in h


@pytest.mark.parametrize("name", ("infer", "export", "train", "eval", "bench"))
def test_output_is_dash_o_everywhere_and_out_is_a_hidden_alias(name: str) -> None:
    h = _help(name)
    assert "-o, --output" in h
    assert "--out " not in h and "--out," not in h  # the old spelling is not advertised...
    if name != "export":
        assert "--out" in _names(name)  # ...but still parses


@pytest.mark.parametrize("name", ("infer", "eval"))
def test_same_runtime_device_precision_choices(name: str) -> None:
    params = {p.name: p for p in _main(name).params}
    assert tuple(params["precision"].type.choices) == options.PRECISIONS
    assert tuple(params["runtime"].type.choices) == options.RUNTIMES
    from medsr.runtime.contract import PRECISIONS
    from medsr.runtime.engines import RUNTIMES

    assert options.PRECISIONS == PRECISIONS and options.RUNTIMES == RUNTIMES


@pytest.mark.parametrize("name", ("infer", "eval"))
def test_tiling_defaults_are_shown(name: str) -> None:
    from medsr.runtime.contract import DEFAULT_OVERLAP, DEFAULT_TILE

    h = re.sub(r"\s+", " ", _help(name))
    assert f"[default: {DEFAULT_TILE};" in h and f"[default: {DEFAULT_OVERLAP}," in h and "Tiles per backend call." in h


@pytest.mark.parametrize("name", ("infer", "eval", "bench", "train"))
def test_device_is_checked_the_same_way(name: str, tmp_path: Path) -> None:
    args = {"infer": [str(tmp_path), "-o", str(tmp_path / "o")], "eval": [str(tmp_path)], "bench": [], "train": []}[name]
    res = CliRunner().invoke(_main(name), [*args, "--device", "tpu"])
    assert res.exit_code == 2 and "use auto, cpu, cuda or cuda:N" in res.output


def test_train_help_and_list_configs_agree() -> None:
    from medsr.train.config import shipped_configs

    listed = CliRunner().invoke(_main("train"), ["--list-configs"]).output.split()
    assert listed == list(shipped_configs()) and listed
    h = _help("train")
    named = set(re.findall(r"\b(cxr_\w+|retina_\w+)\b", h))
    assert named <= set(listed), f"--help names configs --list-configs does not print: {named - set(listed)}"


def test_eval_evaluates_the_default_model_unless_told_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2
    import numpy as np

    from medsr.cli import eval as ev
    from medsr.weights import DEFAULT_MODEL

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((32, 32), np.uint8))
    asked: list[str] = []

    def fake_load(spec: str, **kw: object) -> tuple[str, object]:
        asked.append(spec)
        raise RuntimeError("not loaded in this test")

    monkeypatch.setattr(ev, "_load", fake_load)
    res = CliRunner().invoke(ev.main, [str(tmp_path), "-q", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and asked == [DEFAULT_MODEL], res.output
    res = CliRunner().invoke(ev.main, [str(tmp_path), "--baselines-only", "-q", "--no-lpips", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert asked == [DEFAULT_MODEL] and "| **bicubic** |" in res.output
    assert "s per image including model load" in res.output


def test_third_party_loggers_quiet_by_default_and_visible_with_v() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        options.setup_logging(verbose=0)
        assert logging.getLogger("ray").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("openjpeg").getEffectiveLevel() == logging.WARNING
        assert root.level == logging.INFO
        options.setup_logging(verbose=1)
        assert logging.getLogger("openjpeg").getEffectiveLevel() == logging.INFO and root.level == logging.DEBUG
        options.setup_logging(quiet=True)
        assert root.level == logging.WARNING
    finally:
        options.setup_logging()
        for h in list(root.handlers):
            if h not in saved[1]:
                root.removeHandler(h)
        root.setLevel(saved[0])


def test_json_log_lines() -> None:
    rec = logging.LogRecord("medsr.pacs", logging.INFO, __file__, 1, "ready in %.1f s", (1.25,), None)
    doc = json.loads(options.JsonFormatter().format(rec))
    assert doc["level"] == "INFO" and doc["logger"] == "medsr.pacs" and doc["message"] == "ready in 1.2 s"


def test_no_progress_bars_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert options.progress_wanted(quiet=False) is False
    assert options.progress_wanted(quiet=True) is False


def test_fp16_refusal_on_cpu_suggests_only_what_this_cpu_runs() -> None:
    from medsr.runtime.openvino_backend import native_bf16
    from medsr.runtime.torch_backend import cpu_precisions

    text = cpu_precisions()
    assert "fp32" in text
    assert ("'bf16'" in text) == native_bf16()


def test_infer_without_q_into_a_file_has_no_bars_and_one_line_per_failure(tmp_path: Path) -> None:
    import cv2
    import numpy as np
    import torch
    from conftest import tiny_rrdb

    w = tmp_path / "tiny.pth"
    torch.save({"params_ema": tiny_rrdb(4, 3).state_dict()}, w)
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "ok.png"), np.full((8, 8), 90, np.uint8))
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    res = CliRunner().invoke(_main("infer"), ["--device", "cpu", "--runtime", "torch", "--tile", "16", "--overlap",
                                              "4", "--model", str(w), str(src), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    assert "\r" not in res.output and "\x1b[" not in res.output  # stderr is not a terminal: no tqdm bars
    assert res.output.count("bad.png") == 1 and "1 written" in res.output  # the failure once, with the summary
    assert res.stdout == ""  # everything on stderr
