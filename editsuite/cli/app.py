"""The `editsuite` command: one thin command per task; each validates, then hands over to `run.execute`."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from editsuite.bundle.choices import Attention, Device, Dtype
from editsuite.cli.options import (REFINER_OPTION, RUN_OPTIONS, AllowPickle, DeviceOpt, DtypeOpt, Inputs, Json,
                                   MaskFile, MaxPixels, Model, ModelConfig, Overwrite, PredictionTypeOpt, Quiet,
                                   option_for)
from editsuite.cli.run import execute
from editsuite.errors import UserError
from editsuite.imaging.io import DEFAULT_MAX_PIXELS

def _edit_command(task_cls):
    """The command of one edit, made from its definitions: its input pictures, its parameters (params.Param)
    and the settings around every edit (options.RUN_OPTIONS)."""
    kind = inspect.Parameter.KEYWORD_ONLY
    params = []
    if task_cls.inputs:
        params.append(inspect.Parameter("inputs", kind, annotation=Inputs))
    if "mask" in task_cls.inputs:
        params.append(inspect.Parameter("mask", kind, annotation=MaskFile))
    for p in task_cls.params:
        if p.cli:
            annotation, default = option_for(p)
            params.append(inspect.Parameter(p.name, kind, annotation=annotation, default=default))
    for name, annotation, default, needs_inputs in RUN_OPTIONS:
        if task_cls.inputs or not needs_inputs:
            params.append(inspect.Parameter(name, kind, annotation=annotation, default=default))
    if task_cls.takes_refiner:
        name, annotation, default = REFINER_OPTION
        params.append(inspect.Parameter(name, kind, annotation=annotation, default=default))

    def command(**values):
        execute(task_cls, values)
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = command.__qualname__ = task_cls.name
    command.__doc__ = task_cls.summary
    return command


def build_app(tasks: dict | None = None) -> typer.Typer:
    """The `editsuite` command: one command per edit (made from the task classes), then the tools."""
    from editsuite.tasks import TASKS

    app = typer.Typer(
        name="editsuite",
        help="On-device image editing on Stable Diffusion: txt2img, img2img, inpaint, outpaint, upscale.",
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    for task_cls in (TASKS if tasks is None else tasks).values():
        app.command(name=task_cls.name)(_edit_command(task_cls))
    for tool in (info, tasks_command, batch, convert, verify, serve):
        app.command(name=tool.__name__.removesuffix("_command"))(tool)
    return app


def info(
    model: str = typer.Argument(..., help="Diffusers folder, .safetensors checkpoint, Core ML bundle or hub id."),
    allow_pickle: AllowPickle = False, config: ModelConfig = None, prediction_type: PredictionTypeOpt = None,
):
    """Show what a model is: kind, channels, prediction type, resolution."""
    from editsuite.bundle.loader import load_bundle

    bundle = load_bundle(model, backend="auto", device="cpu", dtype="float32", allow_pickle=allow_pickle,
                         config=config, prediction_type=prediction_type.value if prediction_type else None)
    typer.echo(json.dumps(bundle.identity(), indent=2))


def tasks_command(json_out: Json = False):
    """List the edits and their parameters (--json: the machine-readable description, for tools)."""
    from editsuite.tasks import describe

    description = describe()
    if json_out:
        typer.echo(json.dumps(description, indent=2))
        return
    for task in description:
        typer.echo(f"{task['name']}: {task['summary']}")
        for p in task["params"]:
            typer.echo(f"  {p['name']} ({p['type']}, default {p['default']!r}): {p['help']}")


def batch(
    recipe: Path = typer.Argument(..., help="A recipe file (see tasks/*.toml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be done; run and write nothing."),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="[ADDRESS]",
        help="Run the items on a pool of Ray workers: alone, a local Ray instance (or the recipe's [run] address); "
             "with an address (auto, HOST:6379, ray://HOST:10001), that cluster. Needs pip install "
             "\"editsuite[ray]\"."),
    overwrite: Overwrite = False, quiet: Quiet = False, json_out: Json = False,
):
    """Run one edit over many inputs from a recipe; run it again to resume after a crash or Ctrl-C."""
    from editsuite.cli.batch import run_batch

    code = run_batch(recipe, dry_run=dry_run, overwrite=overwrite, quiet=quiet, as_json=json_out, ray=ray)
    if code:
        raise typer.Exit(code)


def convert(
    model: str = typer.Argument(..., help="Diffusers folder, .safetensors checkpoint or hub id to convert."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the Core ML bundle."),
    resolution: list[str] = typer.Option(
        [], "--resolution", "-r", help="WIDTHxHEIGHT in pixels; repeat for several sizes in one bundle. "
        "Default: the model's native size."),
    attention: Attention = typer.Option(Attention.SPLIT_EINSUM, help="How attention is laid out: split-einsum(-v2) "
                                        "for the Neural Engine, original for the GPU."),
    quantize_bits: Optional[int] = typer.Option(None, help="Compress weights: 8 (int8), 6 or 4 (palettized)."),
    chunk_unet: bool = typer.Option(False, "--chunk-unet", help="Split the UNet into two packages."),
    components: list[str] = typer.Option([], "--components", help="Convert only these: text_encoder, unet, "
                                         "vae_encoder, vae_decoder (repeat the option)."),
    model_version: Optional[str] = typer.Option(
        None, help="The name in the package files (Stable_Diffusion_version_<NAME>_unet.mlpackage), what Apple's "
        "Python pipeline takes as --model-version. Default: the model's name."),
    compile_: bool = typer.Option(False, "--compile", help="macOS: also compile Resources/*.mlmodelc for Apple's "
                                  "Swift CLI and Mochi Diffusion."),
    overwrite: Overwrite = False, quiet: Quiet = False, allow_pickle: AllowPickle = False,
):
    """Convert a model into Core ML packages in Apple's layout, laid out for the Apple Neural Engine."""
    from editsuite.convert.coreml import convert as run_convert, parse_resolution

    sizes = [parse_resolution(r) for r in resolution]
    say = None if quiet else (lambda msg: typer.echo(msg, err=True))
    out = run_convert(model, output, resolutions=sizes, attention=attention.value, quantize_bits=quantize_bits,
                      chunk_unet=chunk_unet, components=components, allow_pickle=allow_pickle, overwrite=overwrite,
                      model_version=model_version, compile=compile_, progress=say)
    if not quiet:
        typer.echo(f"wrote {out}", err=True)


def verify(
    bundle: Path = typer.Argument(..., help="A Core ML bundle (editsuite's, or Apple's packages with --against)."),
    against: Optional[str] = typer.Option(None, help="The source model (default: the one recorded at conversion)."),
    json_out: Json = False,
):
    """Run each converted package in the reference executor and compare it with the PyTorch module."""
    from editsuite.convert.verify import THRESHOLD_DB, verify as run_verify

    checks = run_verify(bundle, against)
    if json_out:
        typer.echo(json.dumps([dict(module=c.module, psnr_db=round(c.psnr_db, 2), ok=c.ok, resolutions=c.resolutions,
                                    ops=c.ops) for c in checks], indent=2))
    else:
        for c in checks:
            ops = sum(c.ops.values())
            typer.echo(f"{c.module:24s} {c.psnr_db:7.1f} dB  {'ok' if c.ok else 'FAIL'}  ({', '.join(c.resolutions)}; "
                       f"{ops} ops)")
    failed = [c.module for c in checks if not c.ok]
    if failed:
        typer.echo(f"error: {', '.join(failed)} below {THRESHOLD_DB:.0f} dB", err=True)
        raise typer.Exit(1)


def serve(
    model: Model = None,
    port: int = typer.Option(7860, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. The default answers this machine only; "
                             "another (e.g. 0.0.0.0) lets anyone who can reach it use the studio and read its "
                             "outputs."),
    output: Path = typer.Option(Path("outputs"), "--output", "-o", help="Folder for the results (kept across "
                                "restarts and listed in the gallery)."),
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    device: DeviceOpt = Device.AUTO, dtype: DtypeOpt = Dtype.AUTO, allow_pickle: AllowPickle = False,
):
    """Start the studio, a local web page: paint a mask, run any edit with live progress, chain results."""
    from editsuite.studio.serve import run_server

    run_server(model=model, host=host, port=port, output=output, max_pixels=max_pixels,
               load_options=dict(device=device.value, dtype=dtype.value, allow_pickle=allow_pickle),
               say=lambda msg: typer.echo(msg, err=True))


app = build_app()


# typer may vendor its own click: catch its exception classes as well as click's
_USAGE_ERRORS = tuple({click.UsageError, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")})
_EXITS = tuple({click.exceptions.Exit, typer.Exit})
_ABORTS = tuple({click.Abort, typer.Abort})


def _quiet_libraries() -> None:
    """diffusers/transformers log loading chatter and draw their own bars; the CLI shows only its own."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' conversion passes draw tqdm bars
    import warnings

    # Pillow warns on stderr about damaged metadata it skips (corrupt EXIF, TIFF tags); a broken file is
    # reported in one line of our own, and a readable one needs no warning
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _ray_flag(args: list[str]) -> list[str]:
    """`batch --ray` takes an optional address, which click options cannot: a `--ray` not followed by an address
    (auto, local, or HOST:PORT / ray://HOST:PORT) becomes `--ray=` (Ray, at the recipe's address or local)."""
    if not args or args[0] != "batch" or "--ray" not in args:
        return args
    i = args.index("--ray")
    after = args[i + 1] if i + 1 < len(args) else ""
    is_address = after in ("auto", "local") or (":" in after and not after.lower().endswith(".toml"))
    return args if is_address else args[:i] + ["--ray="] + args[i + 1:]


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    _quiet_libraries()
    try:
        # without standalone mode, click returns Exit's code
        code = app(args=_ray_flag(list(sys.argv[1:] if argv is None else argv)), standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except _USAGE_ERRORS as e:
        hint = f" (see `editsuite {e.ctx.info_name} --help`)" if e.ctx and e.ctx.parent else " (see `editsuite --help`)"
        typer.echo(f"error: {e.format_message()}{hint}", err=True)
        return 2
    except _EXITS as e:
        return e.exit_code
    except _ABORTS:
        typer.echo("cancelled", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("cancelled; finished outputs are kept, nothing partial was written", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
