"""medsr-bench: run the available inference paths on the same inputs and report speed, memory, error."""

from __future__ import annotations

from pathlib import Path

import click

from medsr.cli.options import LogOptions, device_option, logging_options, output_option

PRESETS = ("smoke", "quick", "full")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--smoke", "preset", flag_value="smoke", help="Tiny model, seconds (what CI runs).")
@click.option("--quick", "preset", flag_value="quick", help="Real x4plus, small inputs and tiles, few repeats.")
@click.option("--full", "preset", flag_value="full", help="Real x4plus, realistic tiles and sizes (slow on CPU).")
@click.option("--model", default=None, help="'tiny', a registered name (realesrgan-x4plus) or a weights file.")
@device_option()
@click.option("--tile", type=int, default=None, help="LR tile size for the path table.")
@click.option("--batch", type=int, default=None, help="Tiles per backend call.")
@click.option("--repeats", type=int, default=None, help="Timed repeats per path (median reported).")
@click.option("--paths", "paths", default=None, help="Comma-separated paths (default: the preset's; 'all').")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--no-scaling", is_flag=True, help="Skip the image-size scaling, overhead and start-up sections.")
@click.option("--memory", "memory", default=None, metavar="HxW",
              help="Instead of the path table: peak RSS of whole medsr-infer runs per CPU path on one synthetic "
                   "16-bit HxW image (e.g. 3000x2500).")
@output_option(help="Output folder [default: benchmarks/results/<host>-<date>].")
@logging_options
def main(preset: str | None, model: str | None, device: str, tile: int | None, batch: int | None,
         repeats: int | None, paths: str | None, threads: int | None, no_scaling: bool, memory: str | None,
         output: Path | None, log: LogOptions) -> None:
    """Benchmark every inference path (PyTorch, ONNX Runtime, TensorRT) against PyTorch fp32.

    Prints ms per tile, LR MP/s, achieved TFLOP/s and % of a GEMM peak measured in the same run,
    peak host/GPU memory and the error vs fp32; writes results.json, results.md and PNG plots.
    Paths that cannot run here are listed as "skipped: <reason>".
    """
    from medsr.bench.paths import PATH_NAMES, PathSkipped, resolve_device

    out = output
    say = (lambda s: None) if log.quiet else (lambda s: click.echo(s, err=True))

    if memory:
        from medsr.bench.memory import CPU_PATHS, memory_markdown, run_memory, write_memory
        from medsr.bench.report import default_out_dir as _out
        from medsr.weights import DEFAULT_MODEL

        try:
            hw = tuple(int(v) for v in memory.lower().split("x"))
            assert len(hw) == 2 and min(hw) > 0
        except (ValueError, AssertionError):
            raise click.UsageError(f"--memory {memory!r}: give HxW, e.g. 3000x2500") from None
        names = [p.strip() for p in paths.split(",")] if paths else None
        known = [n for n, *_ in CPU_PATHS]
        if names and any(n not in known for n in names):
            raise click.UsageError(f"--paths for --memory: known CPU paths are {', '.join(known)}")
        m = model or DEFAULT_MODEL
        rows = run_memory(m, size=hw, paths=names, tile=tile, log=say)  # type: ignore[arg-type]
        click.echo(memory_markdown(rows, m, hw))  # type: ignore[arg-type]
        for name, path in write_memory(rows, out or _out(), m, hw).items():  # type: ignore[arg-type]
            click.echo(f"wrote {name}: {path}")
        return
    from medsr.bench.report import default_out_dir, paths_table, write_report
    from medsr.bench.runner import BenchConfig, run_bench

    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    try:
        dev = resolve_device(device)
    except PathSkipped as e:
        raise click.UsageError(f"--device {device}: {e}") from e
    cfg = BenchConfig.preset_config(preset or "quick", dev)  # no flag: the quick settings
    cfg.device = dev
    if any(v is not None for v in (model, tile, batch, repeats, paths)):
        cfg.preset += "+overrides"
    if model is not None:
        cfg.model = model
    if tile is not None:
        cfg.tile = tile
    if batch is not None:
        cfg.batch = batch
    if repeats is not None:
        cfg.repeats = repeats
    if paths:
        names = list(PATH_NAMES) if paths.strip() == "all" else [p.strip() for p in paths.split(",") if p.strip()]
        unknown = [n for n in names if n not in PATH_NAMES]
        if unknown:
            raise click.UsageError(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(PATH_NAMES)}")
        cfg.paths = names
    if no_scaling:  # also the start-up section: only the path table
        cfg.scaling_sizes, cfg.overhead_hw, cfg.startup = [], None, False
    try:
        result = run_bench(cfg, log=say)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    files = write_report(result, out or default_out_dir())
    click.echo(paths_table(result))
    click.echo("")
    for name, path in files.items():
        click.echo(f"wrote {name}: {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
