"""medsr-export: weights -> ONNX (fp32, fp16) with parity checks -> TensorRT engine + JSON sidecar
(-> a Triton model repository with --triton)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from medsr.cli.options import LogOptions, logging_options

ENGINE_SUFFIXES = (".plan", ".engine")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_name", help="Registered model name (default: the recipe's model).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Weights file (.pth/.safetensors/.param).")
@click.option("--recipe", default="cxr_x4", show_default=True, help="Export recipe (export/*.toml).")
@click.option("--fp16/--no-fp16", default=None, help="Also export the fp16 ONNX and build the engine from it (default: recipe).")
@click.option("--onnx-only", is_flag=True, help="Stop after the ONNX files (no TensorRT engine).")
@click.option("--tile", type=int, help="LR tile edge incl. overlap; the engine profile's opt/max (default: recipe).")
@click.option("--batch", type=int, help="Tiles per call: the profile's opt batch (default: recipe).")
@click.option("--max-batch", type=int, help="The profile's max batch (default: recipe).")
@click.option("--opset", type=int, help="ONNX opset, >= 17 (default: recipe).")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--workspace-gib", type=float, default=4.0, show_default=True, help="TensorRT workspace limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True, help="Builder optimisation level.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file (default: <output dir>/timing.cache).")
@click.option("-o", "--output", help="Engine (.plan), ONNX (.onnx) or OpenVINO IR (.xml) path (default: the recipe's, "
              "e.g. engines/cxr_x4.plan).")
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False, path_type=Path), metavar="REPO",
              help="Also write a Triton model repository: REPO/NAME/config.pbtxt + REPO/NAME/VERSION/model.onnx "
                   "(or model.plan). See docs/scale.md.")
@click.option("--triton-name", help="Model name in the repository (default: the recipe name).")
@click.option("--triton-platform", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="onnx: Triton's ONNX Runtime backend (portable); tensorrt: the engine built here (the server needs "
                   "the same TensorRT version and GPU model).")
@click.option("--triton-kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Instance group kind. gpu serves the fp16 ONNX when one is exported; cpu always the fp32 ONNX.")
@click.option("--triton-instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (per GPU for gpu).")
@click.option("--triton-version", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model version directory; config.pbtxt serves exactly this version.")
@click.option("--triton-overwrite", is_flag=True, help="Replace an existing model version (default: refuse).")
@click.option("--openvino", "openvino_ir", is_flag=True,
              help="Also write the OpenVINO IR (<output>.xml + .bin, fp32; OpenVINO applies bf16 itself).")
@click.option("--openvino-int8", "int8_calib", type=click.Path(exists=True, file_okay=False, path_type=Path),
              metavar="CALIB_DIR", help="Also write an int8 OpenVINO IR (<output>.int8.xml), quantized with NNCF on "
              "crops of the images in CALIB_DIR (training images, never the evaluation set); implies --openvino.")
@logging_options
def main(
    model_name: str | None,
    weights: str | None,
    recipe: str,
    fp16: bool | None,
    onnx_only: bool,
    tile: int | None,
    batch: int | None,
    max_batch: int | None,
    opset: int | None,
    exporter: str,
    workspace_gib: float,
    opt_level: int,
    timing_cache: str | None,
    output: str | None,
    triton_repo: Path | None,
    triton_name: str | None,
    triton_platform: str,
    triton_kind: str,
    triton_instances: int,
    triton_version: int,
    triton_overwrite: bool,
    openvino_ir: bool,
    int8_calib: Path | None,
    log: LogOptions,
) -> None:
    """Export a super-resolution model to ONNX and build a TensorRT engine (when TensorRT and a GPU exist)."""
    from medsr.arch import fold_to_gray
    from medsr.export import export_onnx, fp16_path_for, get_recipe
    from medsr.export.tensorrt import build_engine, tensorrt_status
    from medsr.runtime.backend import BackendError
    from medsr.runtime.contract import profile_for_tiles
    from medsr.weights import load_model

    if model_name and weights:
        raise click.UsageError("give --model or --weights, not both")
    if triton_repo is not None and triton_platform == "tensorrt" and onnx_only:
        raise click.UsageError("--triton-platform tensorrt serves the engine built here; drop --onnx-only")
    try:
        r = get_recipe(recipe)
    except (KeyError, ValueError) as e:
        raise click.UsageError(str(e)) from e
    spec = weights or model_name or r.model
    try:
        loaded = load_model(spec)
    except Exception as e:
        raise click.ClickException(f"cannot load {spec}: {e}") from e
    model, desc = loaded.model, loaded.descriptor
    if desc.scale != r.scale:
        raise click.ClickException(f"{spec} is x{desc.scale} but recipe {r.name} is x{r.scale}; pick a matching --recipe")
    model_id = loaded.model_id
    if r.channels == 1 and model.num_in_ch == 3:
        model, model_id = fold_to_gray(model), f"{loaded.model_id}+gray"
    elif r.channels != model.num_in_ch:
        raise click.ClickException(f"recipe {r.name} wants {r.channels} channels, {spec} has {model.num_in_ch}")
    out = Path(output or r.output or f"engines/{r.name}.plan")
    explicit_engine = output is not None and out.suffix.lower() in ENGINE_SUFFIXES
    want_ir = out.suffix.lower() == ".xml"  # OpenVINO IR: from the fp32 ONNX beside it, no engine
    if out.suffix.lower() == ".onnx":
        onnx_only, onnx32 = True, out
    elif want_ir:
        onnx_only, onnx32 = True, out.with_suffix(".onnx")
    else:
        onnx32 = out.with_suffix(".onnx")
    want16 = r.fp16 if fp16 is None else fp16
    triton = None
    if triton_repo is not None:
        from medsr.export.triton import check_name

        try:
            name = check_name(triton_name or r.name)
        except ValueError as e:
            raise click.UsageError(str(e)) from None

        def triton(src: Path) -> None:
            _write_triton(src, triton_repo, name, batch=batch or r.batch, max_batch=max_batch or r.max_batch,
                          kind=triton_kind, instances=triton_instances, version=triton_version,
                          overwrite=triton_overwrite)

    try:
        click.echo(f"[medsr-export] {model_id} (x{desc.scale}, {model.num_in_ch} ch) recipe {r.name}")
        res = export_onnx(model, onnx32, precision="fp32", model_id=model_id, weights_sha256=loaded.sha256,
                          opset=opset or r.opset, exporter=exporter)
        click.echo(f"  wrote {res.path} ({res.path.stat().st_size / 1e6:.1f} MB, {res.seconds:.1f} s); {res.parity}")
        engine_src = res.path
        if want16:
            res16 = export_onnx(model, fp16_path_for(onnx32), precision="fp16", model_id=model_id,
                                weights_sha256=loaded.sha256, opset=opset or r.opset, exporter=exporter)
            kept = f", kept in fp32: {', '.join(res16.kept_fp32)}" if res16.kept_fp32 else ""
            click.echo(f"  wrote {res16.path} ({res16.path.stat().st_size / 1e6:.1f} MB, {res16.seconds:.1f} s); "
                       f"{res16.parity}{kept}")
            engine_src = res16.path
    except Exception as e:
        raise click.ClickException(f"ONNX export failed: {e}") from e
    if openvino_ir or int8_calib is not None:
        _write_openvino(res.path, int8_calib)
    # the ONNX Triton serves: fp16 on GPU instances when exported (its casts keep fp32 I/O), else fp32
    triton_onnx = engine_src if triton_kind == "gpu" else res.path
    if want_ir:
        from medsr.export.openvino import export_openvino_ir

        try:
            export_openvino_ir(res.path, out)
        except BackendError as e:
            raise click.ClickException(f"OpenVINO IR not written: {e}") from None
        click.echo(f"  wrote {out} + {out.with_suffix('.bin').name} (OpenVINO IR from {res.path.name}; "
                   "medsr-infer --engine runs it on OpenVINO, bf16 where the CPU has it natively)")
    if onnx_only:
        click.echo(f"  {'-o .xml' if want_ir else '--onnx-only'}: no engine built")
        if triton:
            triton(triton_onnx)
        return
    ok, why = tensorrt_status()
    if not ok:
        click.echo(f"  engine step SKIPPED: {why}. The ONNX files above are complete and validated; "
                   f"build {out} on a machine with TensorRT 10+ and a CUDA GPU (same command).", err=True)
        if triton and triton_platform == "tensorrt":
            raise click.ClickException("--triton-platform tensorrt: no engine was built here, so no Triton model was "
                                       "written (use --triton-platform onnx, or run this on the TensorRT machine)")
        if triton:
            triton(triton_onnx)
        sys.exit(1 if explicit_engine else 0)
    profile = profile_for_tiles(res.descriptor, tile=tile or r.tile, overlap=r.overlap, batch=batch or r.batch,
                                max_batch=max_batch or r.max_batch)
    try:
        side = build_engine(engine_src, out, profile=profile, model_id=model_id, weights_sha256=loaded.sha256,
                            workspace_gib=workspace_gib, opt_level=opt_level, timing_cache=timing_cache)
    except BackendError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"  wrote {out} + {out.with_suffix('.json').name}: TensorRT {side['tensorrt_version']}, "
               f"{side['gpu_name']} (sm {side['compute_capability']}), profile {side['profile']}, "
               f"{side['build'].get('seconds')} s")
    if triton:
        triton(out if triton_platform == "tensorrt" else triton_onnx)


def _write_openvino(onnx32: Path, calib: Path | None) -> None:
    """The fp32 IR beside the ONNX, and with ``calib`` the int8 IR quantized on its images."""
    from medsr.runtime.backend import BackendError

    try:
        from medsr.export.openvino import export_openvino_ir

        xml = export_openvino_ir(onnx32, onnx32.with_suffix(".xml"))
        click.echo(f"  wrote {xml} + {xml.with_suffix('.bin').name} (OpenVINO IR, fp32)")
        if calib is not None:
            from medsr.export.int8 import export_int8_ir, int8_path_for

            q = export_int8_ir(xml, int8_path_for(xml), calib)
            click.echo(f"  wrote {q} + {q.with_suffix('.bin').name} (OpenVINO IR, int8, NNCF on {calib})")
    except (BackendError, ImportError, OSError) as e:
        raise click.ClickException(f"OpenVINO export failed: {e}") from None


def _write_triton(src: Path, repo: Path, name: str, **kw: object) -> None:
    from medsr.export.triton import export_triton
    from medsr.runtime.backend import BackendError

    try:
        t = export_triton(src, repo, name=name, **kw)  # type: ignore[arg-type]
    except FileExistsError as e:
        raise click.ClickException(f"{e}: pass --triton-version N for a new version, or --triton-overwrite") from None
    except (BackendError, ValueError, OSError) as e:
        raise click.ClickException(f"Triton repository not written: {e}") from None
    c = t.config
    check = ("validated as Triton ModelConfig" if t.validated
             else "NOT validated: tritonclient is not installed (pip install 'medsr[triton]')")
    click.echo(f"  wrote {t.config_path} + {t.model_path.relative_to(t.model_dir)} ({c.platform}, "
               f"{c.io_dtype} I/O, max_batch_size {c.max_batch_size}, preferred {list(c.preferred_batch_sizes)}, "
               f"{c.instances} x {c.kind}); {check}")


if __name__ == "__main__":  # pragma: no cover
    main()
