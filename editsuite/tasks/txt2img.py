"""Txt2Img: a picture from a prompt; with an SDXL refiner, the base model's steps then the refiner's."""

from __future__ import annotations

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.core.prompts import encode_prompt
from editsuite.errors import UserError
from editsuite.tasks import params as P
from editsuite.tasks.base import Task, TaskResult

DEFAULT_SWITCH = 0.8


def _inside(value: float, factor=None) -> float:
    if not 0 < value < 1:  # diffusers ignores denoising_end/start outside (0, 1)
        raise UserError(f"refiner switch must be between 0 and 1, both excluded (got {value})")
    return value


class Txt2Img(Task):
    name = "txt2img"
    summary = "Paint a picture from a prompt."
    kinds = (ModelKind.BASE,)
    takes_refiner = True
    params = (*P.COMMON, *P.size_params("default: the model's own size"), *P.SDXL_CONDITIONING,
              P.Param("refiner_switch", float, None, f"With --refiner: the share of the schedule the base model runs "
                      f"before the refiner finishes it (default {DEFAULT_SWITCH:g}; diffusers' denoising_end and "
                      "denoising_start).", optional=True, check=_inside, flags=("--switch",)))

    def __init__(self, bundle, *, refiner=None, **kw):
        """`refiner`: a second SDXL bundle (SDXL's refiner, or any SDXL model) that finishes each run from
        `refiner_switch` on, as diffusers' "ensemble of expert denoisers" does."""
        super().__init__(bundle, **kw)
        m = bundle.manifest
        if m.refiner:
            raise UserError(f"{m.name or 'this model'} is an SDXL refiner: it repaints pictures (img2img) or finishes "
                            "a base model's txt2img (--refiner); pass an SDXL base model with --model")
        if refiner is not None:
            r = refiner.manifest
            if not (m.xl and r.xl):
                raise UserError("--refiner pairs two SDXL models; both the model and the refiner must be SDXL")
            same = (r.latent_channels, r.vae_scale_factor) == (m.latent_channels, m.vae_scale_factor)
            if not same or r.kind is not ModelKind.BASE:
                raise UserError(f"the refiner {r.name or ''} does not share the model's latent space; pass an SDXL "
                                "refiner or base model")
        self.refiner = refiner

    @classmethod
    def output_size(cls, args: dict, image_size=None) -> tuple[int, int] | None:
        w, h = args.get("width"), args.get("height")
        return (w, h) if w and h else None  # a side not given is the model's own, known once it loads

    def _run(self, *, v, callback) -> TaskResult:
        if v.refiner_switch is not None and self.refiner is None:
            raise UserError("refiner switch needs a refiner (--refiner MODEL); leave it out")
        # 1. Default size: the model's native resolution
        m = self.bundle.manifest
        f = m.vae_scale_factor
        width, height = v.width or m.native_resolution, v.height or m.native_resolution
        self.check_output(width, height, v.num_images)
        # 2. Prompt, scheduler, generators
        c, guidance, sched, gen = self.start(v, time_ids=self.size_conditioning(v, width, height, "txt2img"))
        # 3. Pure-noise latents (B, 4, H/f, W/f)
        timesteps = loop.schedule(sched, c.steps, self.bundle.device)
        switch = DEFAULT_SWITCH if v.refiner_switch is None else v.refiner_switch
        if self.refiner is not None:  # the base runs the schedule down to the switch (diffusers' denoising_end)
            timesteps = loop.denoising_end(sched, timesteps, switch)
        shape = (c.num_images, m.latent_channels, height // f, width // f)
        latents = loop.noise(shape, gen, self.bundle) * sched.init_noise_sigma
        # 4. Denoise (the refiner finishes), decode
        latents = loop.denoise(self.bundle, sched, loop.LoopInputs(latents, timesteps, guidance),
                               generator=gen, eta=c.eta, callback=callback)
        meta = self.metadata(c, width, height, **self.size_conditioning_settings(v))
        if self.refiner is None:
            return TaskResult(loop.decode(self.bundle, latents), meta)
        latents = self._refine(latents, c, v, width, height, switch, gen, callback)
        meta.update(refiner=self.refiner.identity(), refiner_switch=switch)
        return TaskResult(loop.decode(self.refiner, latents), meta)

    def _refine(self, latents, c, v, width, height, switch, gen, callback):
        """diffusers' StableDiffusionXLImg2ImgPipeline given the base's latents and denoising_start=switch: no
        encode, no fresh noise, the schedule's timesteps below the switch, the refiner's own conditioning."""
        r = self.refiner
        sched = self.new_scheduler(c.scheduler, bundle=r)
        loop.schedule(sched, c.steps, r.device)
        timesteps = loop.denoising_start(sched, switch)
        guidance = encode_prompt(r, c.prompt, c.negative_prompt, c.num_images, c.guidance_scale,
                                 self.size_conditioning(v, width, height, "img2img", bundle=r))
        return loop.denoise(r, sched, loop.LoopInputs(latents, timesteps, guidance), generator=gen, eta=c.eta,
                            callback=callback)
