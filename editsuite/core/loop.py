"""The one denoising loop every task uses, and the latent-space helpers around it.

Random draws follow diffusers exactly: image i of a run draws from its own `torch.Generator("cpu")` seeded
with `seed + i` (diffusers' list-of-generators semantics, AUTOMATIC1111's seed convention), in the same
order as the matching diffusers pipeline. So the same settings give the same image, and each image of a
batch is reproduced alone by its own seed with one image.
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


Generators = list[torch.Generator]


def generators_for(seed: int, n: int = 1) -> Generators:
    """One generator per image: `seed=S` with `n` images behaves as diffusers'
    `generator=[torch.Generator("cpu").manual_seed(S + i) for i in range(n)]`; with n=1 that is the same as
    `generator=torch.Generator("cpu").manual_seed(S)`."""
    return [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(n)]


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


def _cutoff(scheduler, fraction: float) -> int:
    total = scheduler.config.num_train_timesteps
    return int(round(total - fraction * total))


def denoising_end(scheduler, timesteps: torch.Tensor, fraction: float) -> torch.Tensor:
    """The timesteps a base model runs before a refiner takes over at `fraction` of the schedule (diffusers'
    `denoising_end`: those at or above the cut-off timestep)."""
    cut = _cutoff(scheduler, fraction)
    return timesteps[: len([t for t in timesteps if t >= cut])]


def denoising_start(scheduler, fraction: float) -> torch.Tensor:
    """The timesteps a refiner runs from `fraction` of the schedule on (diffusers' `denoising_start`: those
    below the cut-off; a second-order scheduler keeps its pairs whole). Call after `schedule`."""
    cut = _cutoff(scheduler, fraction)
    n = int((scheduler.timesteps < cut).sum())
    if scheduler.order == 2 and n % 2 == 0:
        n += 1
    start = len(scheduler.timesteps) - n
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def image_processor(bundle, **kw) -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=bundle.manifest.vae_scale_factor, **kw)


def noise(shape, generators: Generators, bundle) -> torch.Tensor:
    """Normal noise of `shape`; item i drawn from `generators[i]` (diffusers' randn_tensor does the split)."""
    if shape[0] != len(generators):
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return randn_tensor(tuple(shape), generator=generators, device=bundle.device, dtype=bundle.dtype)


def encode_image(bundle, pixels: torch.Tensor, generators: Generators) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> scaled latents (n, 4, H/f, W/f), one posterior sample per generator
    (encoded once: the posterior of one picture is the same for every image of the batch)."""
    posterior = DiagonalGaussianDistribution(bundle.backend.vae_encode(pixels.to(bundle.device, bundle.dtype)))
    # one sample per generator, concatenated, as diffusers does: this keeps the posterior's memory layout
    # (a strided view), and with it the UNet's rounding; a copy to a contiguous batch changes the last bits
    samples = [posterior.sample(g) for g in generators]
    return (torch.cat(samples) if len(samples) > 1 else samples[0]) * bundle.manifest.scaling_factor


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


def denoise(bundle, scheduler, inputs: LoopInputs, *, generator: Generators, eta: float = 0.0,
            callback: StepCallback | None = None) -> torch.Tensor:
    """Run the scheduler over `inputs.timesteps`; returns the final scaled latents (B, 4, h, w)."""
    latents, g, known = inputs.latents, inputs.guidance, inputs.known
    step_kw = _step_kwargs(scheduler, generator, eta)
    timesteps = inputs.timesteps
    interval = bundle.cache_interval
    unet_kw = {} if g.added is None else {"added": g.added}
    if interval > 1:
        unet_kw["cache"] = bundle.backend.feature_cache()
        if unet_kw["cache"] is None:
            raise UserError(f"cache_interval needs the PyTorch backend, not {bundle.backend.name}; leave it at 1")
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
