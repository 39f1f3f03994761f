"""medsr-node: receive DICOM images (C-STORE), upscale them, forward the derived series (C-STORE or STOW-RS).

``medsr-node --config node.toml`` runs the node; ``medsr-node requeue --config node.toml`` moves
dead-lettered items back into the queue; ``medsr-node list --config node.toml`` shows the queue.
Exit status: 0 stopped by SIGTERM/Ctrl-C, 1 cannot start, 2 bad config, 3 a worker's engine broke
(restart the process: systemd ``Restart=on-failure``).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from medsr.cli.options import LogOptions, logging_options, setup_logging

EXIT_BROKEN = 3


class _SafeFormatter(logging.Formatter):
    """Control characters never reach the log, whatever a message embeds (newlines forge log lines)."""

    def format(self, record: logging.LogRecord) -> str:
        from medsr.pacs.safe import printable

        text = super().format(record)
        lines = text.split("\n")
        if record.exc_info:  # a traceback keeps its lines; its text is still made printable per line
            return "\n".join(printable(line, 10_000) for line in lines)
        return printable(text, 10_000)


def _setup_logging(log: LogOptions, level: str) -> None:
    """The shared logging set-up (-q/-v/--log-format; the config's level is the default), with text lines made
    printable (JSON lines are escaped by the encoder)."""
    setup_logging(log.verbose, log.quiet, log.format, level=level)
    if log.format != "json":
        for h in logging.getLogger().handlers:
            if getattr(h, "_medsr", False):
                h.setFormatter(_SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def _fail(msg: str, code: int) -> None:
    click.echo(f"medsr-node: error: {msg}", err=True)
    sys.exit(code)


def build_upscalers(cfg: Any) -> list[Any]:
    """One :class:`medsr.Upscaler` per ``[model] devices`` entry, by the loading rule of medsr-infer
    (runtime and precision from the file and device)."""
    from medsr import Upscaler

    m = cfg.model
    if m.threads:
        import torch

        torch.set_num_threads(m.threads)
    return [Upscaler.load(str(m.engine) if m.engine is not None else m.name, device=dev, precision=m.precision,
                          tile=m.tile, overlap=m.overlap, batch=m.batch) for dev in m.devices]


def build_volume_upscaler(cfg: Any) -> Any:
    """The through-plane :class:`medsr.volumes.VolumeUpscaler` for CT/MR series (``[volumes] model``, default
    medsr-mr-tp) on the first ``[model] devices`` entry, by the loading rule of medsr-infer; None when
    ``[volumes] enabled = false``."""
    if not cfg.volumes.enabled:
        return None
    from medsr.volumes import VolumeUpscaler

    m = cfg.model
    return VolumeUpscaler.load(cfg.volumes.model, device=m.devices[0], precision=m.precision, tile=m.tile,
                               overlap=m.overlap, batch=m.batch)


def _load(config_path: Path) -> Any:
    from medsr.pacs import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as e:
        _fail(str(e), 2)


_config_opt = click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                           help="The node's TOML file (see docs/pacs.md).")


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_config_opt
@click.option("--check", is_flag=True, help="Validate the config, load the model and open the spool, then exit.")
@logging_options
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, check: bool, log: LogOptions) -> None:
    """Run a DICOM super-resolution node: Storage SCP -> durable queue -> upscale -> forward.

    SIGTERM or Ctrl-C stops it gracefully: no new associations, the instance in hand is finished,
    everything else stays in the queue and is resumed by the next start.
    """
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        _fail("--config is required", 2)
    from medsr.pacs import ConfigError, Node, SpoolError, WorkQueue
    from medsr.weights import WeightsError

    cfg = _load(config_path)
    _setup_logging(log, cfg.log_level)
    logger = logging.getLogger("medsr.pacs")
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    node = None
    try:
        m = cfg.model
        logger.info("loading model %s on %s ... (not listening until ready)", m.engine or m.name, ", ".join(m.devices))
        t0 = time.perf_counter()
        upscalers = build_upscalers(cfg)
        volume = build_volume_upscaler(cfg)
        logger.info("model loaded in %.1f s: %s%s", time.perf_counter() - t0,
                    "; ".join(u.describe() if hasattr(u, "describe") else type(u).__name__ for u in upscalers),
                    f"; CT/MR series: {volume!r}" if volume is not None else "")
        if check:
            WorkQueue(cfg.spool.path).close()
            click.echo(f"medsr-node: {config_path}: OK")
            return
        node = Node(cfg, upscalers=upscalers, volume=volume)
        node.start()
        logger.info("ready in %.1f s (model load included)", time.perf_counter() - t0)
    except ConfigError as e:
        _fail(str(e), 2)
    except (SpoolError, WeightsError) as e:
        _fail(str(e), 1)
    except OSError as e:  # the listen or metrics port is taken, or the address is not local
        _fail(f"cannot listen on {cfg.listen.address}:{cfg.listen.port} or start metrics: {e.strerror or e}", 1)
    except Exception as e:  # a model that cannot be built (bad engine, device missing)
        _fail(f"cannot start: {type(e).__name__}: {e}", 1)

    assert node is not None
    while not stop.wait(0.5):
        if node.broken.is_set():
            node.stop()
            logger.error("exiting with status %d: %s", EXIT_BROKEN, node.broken_reason)
            sys.exit(EXIT_BROKEN)
    node.stop()
    sys.exit(0)


@main.command()
@_config_opt
@click.option("--id", "ids", type=int, multiple=True, help="Only these item ids (default: every dead item).")
def requeue(config_path: Path | None, ids: tuple[int, ...]) -> None:
    """Move dead-lettered items back into the queue (attempts reset); a running node picks them up."""
    with _queue(config_path) as q:
        n = q.requeue(ids or None)
    click.echo(f"medsr-node: requeued {n} item(s)")


@main.command(name="list")
@_config_opt
@click.option("--state", default="dead", show_default=True,
              type=click.Choice(["received", "processing", "outgoing", "delivered", "dead"]))
def list_items(config_path: Path | None, state: str) -> None:
    """Show the queue's items in one state (default: the dead letters, with their reasons)."""
    with _queue(config_path) as q:
        click.echo("  ".join(f"{s} {n}" for s, n in q.counts().items()))
        for it in q.items(state):
            click.echo(f"{it.id}\t{it.key}\t{it.dead_stage or it.state}\tattempts {it.attempts}\t{it.last_error or ''}")


@contextmanager
def _queue(config_path: Path | None) -> Iterator[Any]:
    """The configured spool's work queue, opened beside a running node (no lock); usage errors exit 2."""
    from medsr.pacs import SpoolError, WorkQueue

    if config_path is None:
        _fail("--config is required", 2)
    cfg = _load(config_path)
    try:
        q = WorkQueue(cfg.spool.path, lock=False)
    except SpoolError as e:
        _fail(str(e), 1)
    try:
        yield q
    finally:
        q.close()


if __name__ == "__main__":  # pragma: no cover
    main()
