"""The `editsuite` command: one thin command per task; each validates, then hands over to `run.execute`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from editsuite.cli.options import (AllowPickle, Backend, CacheInterval, ComputeUnits, Device, Dtype, Guidance,
                                   Height, Inputs, Json, MaxOutputPixels, MaxPixels, Model, ModelConfig, Negative, NumImages,
                                   OptGuidance, OptPrompt, Output, Overwrite, PredictionType, Prompt, Quiet, Scheduler,
                                   Seed, Steps, Strength, Width)
from editsuite.cli.run import Job, execute
from editsuite.errors import UserError
from editsuite.imaging.io import DEFAULT_MAX_PIXELS
from editsuite.imaging.output import DEFAULT_MAX_OUTPUT_PIXELS
from editsuite.tasks.base import DEFAULT_GUIDANCE, DEFAULT_STEPS

app = typer.Typer(
    name="editsuite",
    help="On-device image editing on Stable Diffusion: txt2img, img2img, inpaint, outpaint, upscale.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def txt2img(
    prompt: Prompt, negative_prompt: Negative = "", width: Width = None, height: Height = None,
    steps: Steps = DEFAULT_STEPS, guidance: Guidance = DEFAULT_GUIDANCE, seed: Seed = None,
    scheduler: Scheduler = None, num_images: NumImages = 1, output: Output = None, model: Model = None,
    backend: Backend = "auto",
    compute_units: ComputeUnits = "all", device: Device = "auto", dtype: Dtype = "auto",
    cache_interval: CacheInterval = 1, overwrite: Overwrite = False,
    quiet: Quiet = False, json_out: Json = False, allow_pickle: AllowPickle = False,
    config: ModelConfig = None, prediction_type: PredictionType = None,
    max_output_pixels: MaxOutputPixels = DEFAULT_MAX_OUTPUT_PIXELS,
):
    """Paint a picture from a prompt."""
    execute(Job("txt2img", locals(), dict(width=width, height=height)))


@app.command()
def img2img(
    inputs: Inputs, prompt: Prompt, strength: Strength = 0.75, negative_prompt: Negative = "",
    width: Width = None, height: Height = None, steps: Steps = DEFAULT_STEPS, guidance: Guidance = DEFAULT_GUIDANCE,
    seed: Seed = None, scheduler: Scheduler = None, num_images: NumImages = 1, output: Output = None,
    model: Model = None, backend: Backend = "auto",
    compute_units: ComputeUnits = "all", device: Device = "auto", dtype: Dtype = "auto",
    cache_interval: CacheInterval = 1,
    overwrite: Overwrite = False, quiet: Quiet = False, json_out: Json = False, allow_pickle: AllowPickle = False,
    config: ModelConfig = None, prediction_type: PredictionType = None,
    max_output_pixels: MaxOutputPixels = DEFAULT_MAX_OUTPUT_PIXELS,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
):
    """Repaint pictures guided by a prompt."""
    execute(Job("img2img", locals(), dict(strength=strength, width=width, height=height)))


@app.command()
def inpaint(
    inputs: Inputs,
    mask: Path = typer.Option(..., "--mask", help="Mask image: white = repaint, black = keep."),
    prompt: Prompt = ..., strength: Strength = 1.0,
    mask_blur: int = typer.Option(0, min=0, help="Blur the mask edge by this many pixels (a soft paste-back)."),
    only_masked: bool = typer.Option(False, "--only-masked", help="Work on the padded mask box at the model's "
                                     "resolution, then paste back."),
    padding: int = typer.Option(32, min=0, help="Pixels around the mask box with --only-masked."),
    invert_mask: bool = typer.Option(False, "--invert-mask", help="Black = repaint."),
    resize_mask: bool = typer.Option(False, "--resize-mask", help="Stretch a mask of another size to the image."),
    negative_prompt: Negative = "", width: Width = None, height: Height = None, steps: Steps = DEFAULT_STEPS,
    guidance: Guidance = DEFAULT_GUIDANCE, seed: Seed = None, scheduler: Scheduler = None,
    num_images: NumImages = 1, output: Output = None, model: Model = None, backend: Backend = "auto",
    compute_units: ComputeUnits = "all",
    device: Device = "auto", dtype: Dtype = "auto", cache_interval: CacheInterval = 1, overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False, allow_pickle: AllowPickle = False,
    config: ModelConfig = None, prediction_type: PredictionType = None, max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    max_output_pixels: MaxOutputPixels = DEFAULT_MAX_OUTPUT_PIXELS,
):
    """Repaint the white part of a mask; everything else stays as it was."""
    execute(Job("inpaint", locals(), dict(strength=strength, mask_blur=mask_blur, only_masked=only_masked,
                                          padding=padding, invert_mask=invert_mask, resize_mask=resize_mask,
                                          width=width, height=height), mask=mask))


@app.command()
def outpaint(
    inputs: Inputs, prompt: Prompt,
    left: int = typer.Option(0, min=0, help="Pixels to add on the left."),
    right: int = typer.Option(0, min=0, help="Pixels to add on the right."),
    top: int = typer.Option(0, min=0, help="Pixels to add on top."),
    bottom: int = typer.Option(0, min=0, help="Pixels to add at the bottom."),
    expand: int = typer.Option(0, min=0, help="Pixels to add on every side (instead of the four above)."),
    feather: int = typer.Option(16, min=0, help="Fade the new area in over this many pixels from the edge."),
    negative_prompt: Negative = "", steps: Steps = DEFAULT_STEPS, guidance: Guidance = DEFAULT_GUIDANCE,
    seed: Seed = None, scheduler: Scheduler = None, num_images: NumImages = 1, output: Output = None,
    model: Model = None, backend: Backend = "auto",
    compute_units: ComputeUnits = "all", device: Device = "auto", dtype: Dtype = "auto",
    cache_interval: CacheInterval = 1,
    overwrite: Overwrite = False, quiet: Quiet = False, json_out: Json = False, allow_pickle: AllowPickle = False,
    config: ModelConfig = None, prediction_type: PredictionType = None,
    max_output_pixels: MaxOutputPixels = DEFAULT_MAX_OUTPUT_PIXELS,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
):
    """Extend pictures on any side and fill the new area."""
    if expand and any((left, right, top, bottom)):
        raise UserError("give either --expand or --left/--right/--top/--bottom, not both")
    sides = dict(left=expand, right=expand, top=expand, bottom=expand) if expand else \
        dict(left=left, right=right, top=top, bottom=bottom)
    execute(Job("outpaint", locals(), dict(**sides, feather=feather)))


@app.command()
def upscale(
    inputs: Inputs, prompt: OptPrompt = "",
    scale: float = typer.Option(4.0, help="Upscaling factor."),
    tile: int = typer.Option(None, help="Tile size for the tiled upscale (default: the model's resolution)."),
    overlap: int = typer.Option(None, min=0, help="Overlap between tiles, in pixels (default: 1/8 of the tile)."),
    strength: Strength = 0.3,
    noise_level: int = typer.Option(20, min=0, help="x4 upscaler: noise added to the low-res input."),
    negative_prompt: Negative = "", steps: Steps = DEFAULT_STEPS, guidance: OptGuidance = None, seed: Seed = None,
    scheduler: Scheduler = None, num_images: NumImages = 1, output: Output = None, model: Model = None,
    backend: Backend = "auto",
    compute_units: ComputeUnits = "all", device: Device = "auto", dtype: Dtype = "auto",
    cache_interval: CacheInterval = 1, overwrite: Overwrite = False,
    quiet: Quiet = False, json_out: Json = False, allow_pickle: AllowPickle = False,
    config: ModelConfig = None, prediction_type: PredictionType = None,
    max_output_pixels: MaxOutputPixels = DEFAULT_MAX_OUTPUT_PIXELS,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
):
    """Make pictures larger: the x4 upscaler model, or a tiled img2img pass with a base model."""
    execute(Job("upscale", locals(), dict(scale=scale, tile=tile, overlap=overlap, strength=strength,
                                          noise_level=noise_level)))


@app.command()
def info(
    model: str = typer.Argument(..., help="Diffusers folder, .safetensors checkpoint, Core ML bundle or hub id."),
    allow_pickle: AllowPickle = False, config: ModelConfig = None, prediction_type: PredictionType = None,
):
    """Show what a model is: kind, channels, prediction type, resolution."""
    from editsuite.bundle.loader import load_bundle

    bundle = load_bundle(model, backend="auto", device="cpu", dtype="float32", allow_pickle=allow_pickle,
                         config=config, prediction_type=prediction_type)
    typer.echo(json.dumps(bundle.identity(), indent=2))


@app.command()
def batch(
    recipe: Path = typer.Argument(..., help="A recipe file (see tasks/*.toml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be done; run and write nothing."),
    overwrite: Overwrite = False, quiet: Quiet = False, json_out: Json = False,
):
    """Run one edit over many inputs from a recipe; run it again to resume after a crash or Ctrl-C."""
    from editsuite.cli.batch import run_batch

    code = run_batch(recipe, dry_run=dry_run, overwrite=overwrite, quiet=quiet, as_json=json_out)
    if code:
        raise typer.Exit(code)


@app.command()
def convert(
    model: str = typer.Argument(..., help="Diffusers folder, .safetensors checkpoint or hub id to convert."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the Core ML bundle."),
    resolution: list[str] = typer.Option(
        [], "--resolution", "-r", help="WIDTHxHEIGHT in pixels; repeat for several sizes in one bundle. "
        "Default: the model's native size."),
    attention: str = typer.Option("split-einsum", help="original, split-einsum or split-einsum-v2."),
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
    out = run_convert(model, output, resolutions=sizes, attention=attention, quantize_bits=quantize_bits,
                      chunk_unet=chunk_unet, components=components, allow_pickle=allow_pickle, overwrite=overwrite,
                      model_version=model_version, compile=compile_, progress=say)
    if not quiet:
        typer.echo(f"wrote {out}", err=True)


@app.command()
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    _quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False)  # without standalone mode, click returns Exit's code
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
