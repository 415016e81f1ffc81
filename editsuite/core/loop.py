"""The one denoising loop every task uses, and the latent-space helpers around it.

Random draws follow diffusers exactly: every task draws from one `torch.Generator("cpu")` seeded with
`seed`, in the same order as the matching diffusers pipeline, so the same settings give the same image.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from editsuite.core.prompts import Guidance
from editsuite.errors import UserError


class Cancelled(Exception):
    """Raised when a step callback asks to stop."""


@dataclasses.dataclass(frozen=True)
class Step:
    """What a per-step callback sees: progress, the timestep and the current latents (B, 4, h, w)."""

    index: int  # 0-based
    total: int
    timestep: torch.Tensor
    latents: torch.Tensor


StepCallback = Callable[[Step], "bool | None"]  # return False to cancel


def preview(bundle, latents: torch.Tensor) -> list:
    """A step's latents as pictures (a full VAE decode), for live previews from a step callback:
    `callback=lambda step: show(preview(bundle, step.latents)[0])`."""
    return decode(bundle, latents)


@dataclasses.dataclass
class KnownRegion:
    """4-channel inpainting: after each step, keep the noised original where `mask` is 0.

    image_latents (B, 4, h, w) scaled; mask (B, 1, h, w) with 1 = repaint; noise (B, 4, h, w).
    """

    image_latents: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor


@dataclasses.dataclass
class LoopInputs:
    latents: torch.Tensor  # (B, 4, h, w), already noised and scaled for the first timestep
    timesteps: torch.Tensor
    guidance: Guidance
    extra_channels: torch.Tensor | None = None  # (B', C, h, w) concatenated after scale_model_input; B' = UNet batch
    class_labels: torch.Tensor | None = None  # x4 upscaler: noise level per UNet batch item
    known: KnownRegion | None = None


def generator_for(seed: int) -> torch.Generator:
    """`seed=S` behaves as `generator=torch.Generator("cpu").manual_seed(S)` does in diffusers."""
    return torch.Generator("cpu").manual_seed(int(seed))


def schedule(scheduler, steps: int, device, strength: float | None = None) -> torch.Tensor:
    """Timesteps to run. `strength` keeps the last `strength` of the schedule (diffusers' arithmetic);
    None runs the whole schedule as txt2img does (no begin index)."""
    try:
        scheduler.set_timesteps(steps, device=device)
    except ValueError as e:  # e.g. PNDM's Runge-Kutta warm-up needs more steps than given
        raise UserError(f"{type(scheduler).__name__} cannot run {steps} steps ({str(e).splitlines()[0]}); use more "
                        "--steps or another --scheduler") from None
    if strength is None:
        return scheduler.timesteps
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def image_processor(bundle, **kw) -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=bundle.manifest.vae_scale_factor, **kw)


def noise(shape, generator: torch.Generator, bundle) -> torch.Tensor:
    return randn_tensor(tuple(shape), generator=generator, device=bundle.device, dtype=bundle.dtype)


def encode_image(bundle, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f), sampled from the VAE posterior."""
    moments = bundle.backend.vae_encode(pixels.to(bundle.device, bundle.dtype))
    return DiagonalGaussianDistribution(moments).sample(generator) * bundle.manifest.scaling_factor


def decode(bundle, latents: torch.Tensor) -> list:
    """Scaled latents (B, 4, h, w) -> list of PIL images."""
    pixels = bundle.backend.vae_decode(latents / bundle.manifest.scaling_factor)
    if not torch.isfinite(pixels).all():  # a NaN would be saved as a flat picture that looks like a result
        raise UserError("the model's output holds NaN or infinite values, so no picture was made; lower the "
                        "guidance or the strength, or run with --dtype float32")
    return image_processor(bundle).postprocess(pixels.float(), output_type="pil")


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kw = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


def denoise(bundle, scheduler, inputs: LoopInputs, *, generator, eta: float = 0.0,
            callback: StepCallback | None = None) -> torch.Tensor:
    """Run the scheduler over `inputs.timesteps`; returns the final scaled latents (B, 4, h, w)."""
    latents, g, known = inputs.latents, inputs.guidance, inputs.known
    step_kw = _step_kwargs(scheduler, generator, eta)
    timesteps = inputs.timesteps
    interval = bundle.cache_interval
    unet_kw = {}
    if interval > 1:
        if not hasattr(bundle.backend, "feature_cache"):
            raise UserError(f"cache_interval needs the PyTorch backend, not {bundle.backend.name}; leave it at 1")
        unet_kw["cache"] = bundle.backend.feature_cache()
    for i, t in enumerate(timesteps):
        model_in = torch.cat([latents] * 2) if g.do_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        if inputs.extra_channels is not None:
            model_in = torch.cat([model_in, inputs.extra_channels], dim=1)
        if interval > 1:
            unet_kw["cache"].reuse = i % interval != 0
        pred = g.combine(bundle.backend.unet(model_in, t, g.context, class_labels=inputs.class_labels, **unet_kw))
        latents = scheduler.step(pred, t, latents, **step_kw, return_dict=False)[0]
        if known is not None:
            proper = known.image_latents
            if i < len(timesteps) - 1:
                proper = scheduler.add_noise(proper, known.noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - known.mask) * proper + known.mask * latents
        if callback is not None and callback(Step(i, len(timesteps), t, latents)) is False:
            raise Cancelled(f"cancelled after step {i + 1} of {len(timesteps)}")
    return latents
