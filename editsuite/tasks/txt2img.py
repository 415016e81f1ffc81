"""Txt2Img: a picture from a prompt."""

from __future__ import annotations

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.tasks import params as P
from editsuite.tasks.base import Task, TaskResult


class Txt2Img(Task):
    name = "txt2img"
    summary = "Paint a picture from a prompt."
    kinds = (ModelKind.BASE,)
    params = (*P.COMMON, *P.size_params("default: the model's own size"))

    @classmethod
    def output_size(cls, args: dict, image_size=None) -> tuple[int, int] | None:
        w, h = args.get("width"), args.get("height")
        return (w, h) if w and h else None  # a side not given is the model's own, known once it loads

    def _run(self, *, v, callback) -> TaskResult:
        # 1. Default size: the model's native resolution
        m = self.bundle.manifest
        f = m.vae_scale_factor
        width, height = v.width or m.native_resolution, v.height or m.native_resolution
        self.check_output(width, height, v.num_images)
        # 2. Prompt, scheduler, generators
        c, guidance, sched, gen = self.start(v)
        # 3. Pure-noise latents (B, 4, H/f, W/f)
        timesteps = loop.schedule(sched, c.steps, self.bundle.device)
        shape = (c.num_images, m.latent_channels, height // f, width // f)
        latents = loop.noise(shape, gen, self.bundle) * sched.init_noise_sigma
        # 4. Denoise, decode
        latents = loop.denoise(self.bundle, sched, loop.LoopInputs(latents, timesteps, guidance),
                               generator=gen, eta=c.eta, callback=callback)
        return TaskResult(loop.decode(self.bundle, latents), self.metadata(c, width, height))
