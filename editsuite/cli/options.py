"""Option aliases shared by every command, so signatures read like documentation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Prompt = Annotated[str, typer.Option("--prompt", "-p", help="What to paint.")]
OptPrompt = Annotated[str, typer.Option("--prompt", "-p", help="What to paint (optional).")]
Negative = Annotated[str, typer.Option("--negative-prompt", "-n", help="What to steer away from.")]
Inputs = Annotated[list[Path], typer.Argument(help="Input image(s).", show_default=False)]
Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Output file, or folder when there are several outputs. Default: current folder.")]
Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Diffusers folder, .safetensors checkpoint, converted Core ML bundle or hub id. "
    "Default: the built-in demo model.")]
Backend = Annotated[str, typer.Option(help="auto, torch or coreml.")]
ComputeUnits = Annotated[str, typer.Option(
    help="Core ML bundles on macOS: all, cpu-and-ne, cpu-and-gpu or cpu-only.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
Dtype = Annotated[str, typer.Option(
    help="auto (bfloat16 on CPUs that have it, float16 on GPUs, else float32), float32, bfloat16 or float16.")]
CacheInterval = Annotated[int, typer.Option(
    help="Run the whole UNet every N-th step only, the outer level in between (DeepCache): faster, "
    "slightly different picture. 1 = off.")]
Steps = Annotated[int, typer.Option(help="Denoising steps.")]
Guidance = Annotated[float, typer.Option("--guidance", "-g", help="Classifier-free guidance scale.")]
OptGuidance = Annotated[Optional[float], typer.Option(
    "--guidance", "-g", help="Classifier-free guidance scale (default 9 for the x4 upscaler, else 7.5).")]
Seed = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed (default: a random one, recorded).")]
Scheduler = Annotated[Optional[str], typer.Option(
    help="Scheduler: dpm++2m, dpm++2m-karras, euler, euler-a, ddim, pndm, lms, heun, unipc, or a diffusers class "
    "name. Default: the model's own.")]
NumImages = Annotated[int, typer.Option("--num-images", "-N", help="Images per input.")]
Width = Annotated[Optional[int], typer.Option(help="Width in pixels (a multiple of 8).")]
Height = Annotated[Optional[int], typer.Option(help="Height in pixels (a multiple of 8).")]
Strength = Annotated[float, typer.Option(help="How much to change: 0 keeps the input, 1 repaints fully.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notices.")]
Json = Annotated[bool, typer.Option("--json", help="Print the outputs and their settings as JSON.")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Load .ckpt/.bin/.pt checkpoints (with torch.load(weights_only=True)).")]
MaxPixels = Annotated[int, typer.Option(help="Refuse input images with more pixels than this.")]
ModelConfig = Annotated[Optional[str], typer.Option(
    "--config", help="Diffusers folder that says what a Core ML bundle made by Apple's converter cannot: scheduler, "
    "prediction type, latent scale, tokenizer (or the config of an unusual single-file checkpoint).")]
PredictionType = Annotated[Optional[str], typer.Option(
    help="epsilon or v_prediction: override the model's (needed for Apple-converted SD 2.x 768 bundles without "
    "--config).")]
MaxOutputPixels = Annotated[int, typer.Option(
    help="Refuse a run whose pictures would hold more pixels than this, all images together (raise it for big "
    "pictures or many images).")]
