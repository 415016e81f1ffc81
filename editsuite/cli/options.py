"""The settings around an edit (which model, how it runs, where the outputs go), defined once as option types
(`Annotated[...]`) that every command reuses. The edits' own parameters come from their definitions
(tasks/params.py); `RUN_OPTIONS` lists the settings each edit command takes besides them."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from editsuite.bundle.choices import Backend, ComputeUnits, Device, Dtype, PredictionType
from editsuite.imaging.io import DEFAULT_MAX_PIXELS
from editsuite.imaging.output import DEFAULT_MAX_OUTPUT_PIXELS

Inputs = Annotated[list[Path], typer.Argument(help="Input image(s).", show_default=False)]
MaskFile = Annotated[Path, typer.Option("--mask", help="Mask image: white = repaint, black = keep.")]
Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Output file, or folder when there are several outputs. Default: current folder.")]
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Diffusers folder, .safetensors checkpoint, converted Core ML bundle or hub id. "
    "Default: the built-in demo model.")]
BackendOpt = Annotated[Backend, typer.Option("--backend", help="Where the model runs.")]
ComputeUnitsOpt = Annotated[ComputeUnits, typer.Option("--compute-units", help="Core ML bundles on macOS: where "
                                                       "Core ML runs them.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="PyTorch device.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="auto: bfloat16 on CPUs that have it, float16 on GPUs, "
                                         "else float32.")]
CacheInterval = Annotated[int, typer.Option(
    help="Run the whole UNet every N-th step only, the outer level in between (DeepCache): faster, "
    "slightly different picture. 1 = off.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notices.")]
Json = Annotated[bool, typer.Option("--json", help="Print the outputs and their settings as JSON.")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Load .ckpt/.bin/.pt checkpoints (with torch.load(weights_only=True)).")]
MaxPixels = Annotated[int, typer.Option(help="Refuse input images with more pixels than this.")]
ModelConfig = Annotated[Optional[str], typer.Option(
    "--config", help="Diffusers folder that says what a Core ML bundle made by Apple's converter cannot: scheduler, "
    "prediction type, latent scale, tokenizer (or the config of an unusual single-file checkpoint).")]
PredictionTypeOpt = Annotated[Optional[PredictionType], typer.Option(
    "--prediction-type", help="Override the model's (needed for Apple-converted SD 2.x 768 bundles without "
    "--config).")]
VaeOpt = Annotated[Optional[str], typer.Option(
    "--vae", help="A VAE to use instead of the model's own: a diffusers VAE folder or a .safetensors file (e.g. an "
    "SDXL fp16-fix VAE).")]
Refiner = Annotated[Optional[str], typer.Option(
    "--refiner", help="An SDXL refiner (or any SDXL model) that finishes the run from --switch on, as diffusers' "
    "ensemble of expert denoisers (SDXL models only).")]
MaxOutputPixels = Annotated[int, typer.Option(
    help="Refuse a run whose pictures would hold more pixels than this, all images together (raise it for big "
    "pictures or many images).")]

# (name, type, default, only for edits that take input pictures)
RUN_OPTIONS = (
    ("output", Output, None, False), ("model", Model, None, False), ("backend", BackendOpt, Backend.AUTO, False),
    ("compute_units", ComputeUnitsOpt, ComputeUnits.ALL, False), ("device", DeviceOpt, Device.AUTO, False),
    ("dtype", DtypeOpt, Dtype.AUTO, False), ("cache_interval", CacheInterval, 1, False),
    ("overwrite", Overwrite, False, False), ("quiet", Quiet, False, False), ("json_out", Json, False, False),
    ("allow_pickle", AllowPickle, False, False), ("config", ModelConfig, None, False),
    ("prediction_type", PredictionTypeOpt, None, False), ("vae", VaeOpt, None, False),
    ("max_output_pixels", MaxOutputPixels, DEFAULT_MAX_OUTPUT_PIXELS, False),
    ("max_pixels", MaxPixels, DEFAULT_MAX_PIXELS, True),
)
REFINER_OPTION = ("refiner", Refiner, None)  # edits whose task takes a refiner (Task.takes_refiner)


def option_for(param) -> tuple[object, object]:
    """(annotation, default) of the CLI option for an edit's parameter (params.Param)."""
    kind = Optional[param.kind] if param.optional else param.kind
    flags = param.cli_flags()
    annotation = Annotated[kind, typer.Option(*flags, help=param.help, show_default=param.default is not None)]
    return annotation, inspect.Parameter.empty if param.cli_required else param.default
