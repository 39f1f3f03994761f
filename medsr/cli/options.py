"""The argument groups every ``medsr-*`` CLI shares, declared once (as Polygraphy does).

- :func:`output_option`: ``-o/--output`` (the old ``--out`` keeps working, hidden from --help);
- :func:`model_options`: ``--model`` / ``--engine``;
- :func:`runtime_options`: ``--runtime``, ``--device``, ``--precision`` (one choice list for every CLI);
- :func:`tiling_options`: ``--tile``, ``--overlap``, ``--batch`` (defaults shown in --help);
- :func:`logging_options`: ``-q``, ``-v``, ``--log-format text|json``; progress bars only on a terminal.

A CLI stacks the groups it needs; the values reach its ``main`` as plain keyword arguments, except the
logging group, which sets up logging and hands ``main`` one :class:`LogOptions` as ``log``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: every CLI's runtime and precision choices (medsr.runtime.engines.RUNTIMES, medsr.runtime.contract.PRECISIONS)
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8")
#: loggers of libraries medsr uses: warnings only, unless -v
THIRD_PARTY_LOGGERS = ("ray", "ray.data", "ray.train", "openjpeg", "pynetdicom", "pydicom", "urllib3", "filelock",
                       "matplotlib", "PIL", "openvino")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Option(click.Option):
    """A click option with old spellings that still parse but are not shown (``hidden_aliases``) and a
    default shown in --help that is computed only when help is printed (``lazy_default``: no torch import
    for a plain run's parsing)."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), lazy_default: Callable[[], str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = frozenset(hidden_aliases)
        self.lazy_default = lazy_default

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts, secondary = self.opts, self.secondary_opts
        self.opts = [o for o in opts if o not in self.hidden_aliases]
        self.secondary_opts = [o for o in secondary if o not in self.hidden_aliases]
        if self.lazy_default is not None:
            self.show_default = self.lazy_default()
        try:
            record = super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = opts, secondary
        if record is not None and self.lazy_default is not None:  # click puts a text default in parentheses
            record = (record[0], record[1].replace(f"default: ({self.show_default})", f"default: {self.show_default}"))
        return record


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


# ------------------------------------------------------------------------------------ input/output


def output_option(*, required: bool = False, help: str = "Output folder.", file_okay: bool = False,
                  dir_okay: bool = True, path_type: type | None = None) -> Callable[[F], F]:
    """``-o/--output`` (value reaches ``main`` as ``output``); ``--out`` is a hidden alias."""
    from pathlib import Path

    return click.option("-o", "--output", "--out", "output", cls=Option, hidden_aliases=("--out",), required=required,
                        type=click.Path(file_okay=file_okay, dir_okay=dir_okay, path_type=path_type or Path),
                        help=help)


# ------------------------------------------------------------------------------------ model/engine


def model_options(*, multiple: bool = False, model_help: str | None = None,
                  engine_help: str | None = None) -> Callable[[F], F]:
    """``--model`` (registered name or weights file) and ``--engine`` (engine or model file); repeatable with
    ``multiple`` (values reach ``main`` as ``models`` / ``engines``, else ``model`` / ``engine``)."""
    from medsr.weights.registry import DEFAULT_MODEL

    m_help = model_help or (f"Registered model name or weights file (.pth/.safetensors/.param) [default: "
                            f"{DEFAULT_MODEL}, the shipped chest X-ray fidelity model].")
    e_help = engine_help or ("Engine or model file: .xml (OpenVINO IR), .onnx (ONNX Runtime), .plan (TensorRT), "
                             ".pth/.safetensors (weights).")
    return _stack(
        click.option("--model", "models" if multiple else "model", multiple=multiple, help=m_help
                     + (" Repeatable." if multiple else "")),
        click.option("--engine", "engines" if multiple else "engine", multiple=multiple,
                     type=click.Path(exists=True, dir_okay=False), help=e_help + (" Repeatable." if multiple else "")),
    )


# -------------------------------------------------------------------------- runtime/device/precision


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _DEVICE_RE.match(value.strip().lower()):
        raise click.BadParameter(f"{value!r}: use auto, cpu, cuda or cuda:N")
    return None if value is None else value.strip().lower()


RUNTIME_HELP = ("Inference engine; auto: from the file type (.xml: OpenVINO, .onnx: ONNX Runtime, .plan: TensorRT; "
                "weights: OpenVINO on a CPU when installed, else PyTorch).")
PRECISION_HELP = ("Default: weights on a CPU run OpenVINO bf16 where the CPU computes bf16 natively, else fp32; "
                  "weights on CUDA fp32; .onnx/.plan/.xml the file's own. fp16 and tf32 need CUDA. Another one is "
                  "honoured or refused (the refusal names what this machine can run), never ignored. int8: an int8 OpenVINO IR "
                  "(medsr-export --openvino-int8; measured and not chosen automatically: docs/benchmarks.md).")


def device_option(*, default: str | None = "auto", help: str = "auto (CUDA when available), cpu, cuda or cuda:N.") \
        -> Callable[[F], F]:
    """``--device``: auto, cpu, cuda or cuda:N in every CLI."""
    return click.option("--device", default=default, show_default=default is not None, callback=_check_device,
                        help=help)


def runtime_options(*, runtime: bool = True) -> Callable[[F], F]:
    """``--runtime`` (with ``runtime``), ``--device``, ``--precision``: the same choices in every CLI."""
    opts: list[Callable[[F], F]] = []
    if runtime:
        opts.append(click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                                 help=RUNTIME_HELP))
    opts += [device_option(), click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                                           help=PRECISION_HELP)]
    return _stack(*opts)


# ------------------------------------------------------------------------------------------- tiling


def _tile_default() -> str:
    from medsr.runtime.contract import DEFAULT_TILE

    return str(DEFAULT_TILE)


def _overlap_default() -> str:
    from medsr.runtime.contract import DEFAULT_OVERLAP

    return f"{DEFAULT_OVERLAP}, at most half the tile"


def _batch_default() -> str:
    from medsr.runtime.contract import DEFAULT_BATCH, DEFAULT_CPU_BATCH

    return f"{DEFAULT_CPU_BATCH} on a CPU, {DEFAULT_BATCH} on a GPU, or the engine's preferred batch"


def tiling_options(*, what: str = "") -> Callable[[F], F]:
    """``--tile``, ``--overlap``, ``--batch`` (None when not given: the runtime's defaults, shown in --help)."""
    return _stack(
        click.option("--tile", type=click.IntRange(min=1), default=None, cls=Option, lazy_default=_tile_default,
                     help=f"LR tile edge in pixels, overlap included{what}."),
        click.option("--overlap", type=click.IntRange(min=0), default=None, cls=Option,
                     lazy_default=_overlap_default, help="LR pixels shared by neighbouring tiles."),
        click.option("--batch", type=click.IntRange(min=1), default=None, cls=Option, lazy_default=_batch_default,
                     help="Tiles per backend call."),
    )


# ------------------------------------------------------------------------------------------ logging


@dataclass(frozen=True)
class LogOptions:
    """What the logging group decided: ``progress`` is True only when bars are wanted and stderr is a terminal."""

    quiet: bool = False
    verbose: int = 0
    format: str = "text"
    progress: bool = False


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line (for services and log collectors): time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(verbose: int = 0, quiet: bool = False, fmt: str = "text", level: str | None = None) -> None:
    """Root logging to stderr: warnings with -q, info by default, debug with -v (``level`` overrides the
    default, e.g. a config file's). Third-party loggers (Ray, openjpeg, pynetdicom...) show warnings only,
    unless -v."""
    lvl = logging.DEBUG if verbose else logging.WARNING if quiet else getattr(logging, (level or "INFO").upper())
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_medsr", False):
            root.removeHandler(h)
    handler._medsr = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


def progress_wanted(quiet: bool) -> bool:
    """Progress bars: not with -q, and never into a file or pipe (escape sequences in logs)."""
    return not quiet and sys.stderr.isatty()


def logging_options(f: F) -> F:
    """``-q/--quiet`` (``--no-progress`` is a hidden alias), ``-v/--verbose``, ``--log-format``: the wrapped
    ``main`` gets ``log: LogOptions`` instead, with logging already set up."""

    @functools.wraps(f)
    def wrapper(*args: Any, quiet: bool, verbose: int, log_format: str, **kwargs: Any) -> Any:
        setup_logging(verbose, quiet, log_format)
        return f(*args, log=LogOptions(quiet, verbose, log_format, progress_wanted(quiet)), **kwargs)

    return _stack(
        click.option("-q", "--quiet", "--no-progress", "quiet", is_flag=True, cls=Option,
                     hidden_aliases=("--no-progress",), help="No progress bars; warnings and errors only."),
        click.option("-v", "--verbose", count=True,
                     help="More detail: -v debug messages, third-party libraries (Ray, openjpeg) included."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                     help="Log lines as text or one JSON object per line (services, log collectors)."),
    )(wrapper)  # type: ignore[return-value]
