"""medsr-node: receive DICOM images (C-STORE), upscale them, forward the derived series (C-STORE or STOW-RS)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import click

from medsr.cli.options import LogOptions, logging_options, setup_logging


def _fail(msg: str, code: int) -> None:
    click.echo(f"medsr-node: error: {msg}", err=True)
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The node's TOML file (see docs/pacs.md).")
@click.option("--check", is_flag=True, help="Validate the config, load the model and open the spool, then exit.")
@logging_options
def main(config_path: Path, check: bool, log: LogOptions) -> None:
    """Run a DICOM super-resolution node: Storage SCP -> durable spool -> upscale -> forward.

    SIGTERM or Ctrl-C stops it gracefully: no new associations, the instance in hand is finished,
    everything else stays in the spool and is resumed by the next start.
    """
    from medsr.pacs import ConfigError, Node, SpoolError, load_config
    from medsr.weights import WeightsError

    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        _fail(str(e), 2)
    setup_logging(log.verbose, log.quiet, log.format, level=cfg.log_level)  # the config's level is the default
    logger = logging.getLogger("medsr.pacs")

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    try:
        m = cfg.model
        logger.info("loading model %s on %s ... (not listening until ready)",
                    m.engine or m.name, ", ".join(m.devices))
        t0 = time.perf_counter()
        ups = Node(cfg).build_upscalers()
        logger.info("model loaded in %.1f s: %s", time.perf_counter() - t0,
                    "; ".join(f"{u.model_id} x{u.scale} on {u.backend.name} {u.backend.precision}" for u in ups))
        node = Node(cfg, upscalers=ups)
        if check:
            from medsr.pacs import Spool

            Spool(cfg.spool.path).close()
            click.echo(f"medsr-node: {config_path}: OK")
            return
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

    while not stop.wait(0.5):
        pass
    node.stop()
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
