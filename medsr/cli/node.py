"""medsr-node: receive DICOM images (C-STORE), upscale them, forward the derived series (C-STORE or STOW-RS)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs association details (and, at debug, dataset summaries): keep it to warnings
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _fail(msg: str, code: int) -> None:
    click.echo(f"medsr-node: error: {msg}", err=True)
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The node's TOML file (see docs/pacs.md).")
@click.option("--check", is_flag=True, help="Validate the config, load the model and open the spool, then exit.")
def main(config_path: Path, check: bool) -> None:
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
    _setup_logging(cfg.log_level)
    log = logging.getLogger("medsr.pacs")

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    node = Node(cfg)
    try:
        if check:
            node.build_upscalers()
            from medsr.pacs import Spool

            Spool(cfg.spool.path).close()
            click.echo(f"medsr-node: {config_path}: OK")
            return
        node.start()
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
