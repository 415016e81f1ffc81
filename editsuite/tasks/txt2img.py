"""Txt2Img: a picture from a prompt."""

from __future__ import annotations

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.tasks.base import DEFAULT_GUIDANCE, DEFAULT_STEPS, Common, Task, TaskResult, check_size


class Txt2Img(Task):
    name = "txt2img"
    kinds = (ModelKind.BASE,)

    @classmethod
    def output_size(cls, args: dict, image_size=None) -> tuple[int, int] | None:
        w, h = args.get("width"), args.get("height")
        return (w or h, h or w) if (w or h) else None  # neither: the model's own size, known once it loads

    def run(self, prompt: str = "", *, width: int | None = None, height: int | None = None,
            negative_prompt: str = "", steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
            seed: int | None = None, scheduler: str | None = None, num_images: int = 1, eta: float = 0.0,
            callback: loop.StepCallback | None = None) -> TaskResult:
        # 1. Check inputs; default size is the model's native resolution
        m = self.bundle.manifest
        f = m.vae_scale_factor
        width = check_size(width, "width", f) or m.native_resolution
        height = check_size(height, "height", f) or m.native_resolution
        self.check_output(width, height, num_images)
        # 2. Prompt, scheduler, generator
        c, guidance, sched, gen = self.start(
            Common(prompt, negative_prompt, steps, guidance_scale, seed, scheduler, num_images, eta))
        # 3. Pure-noise latents (B, 4, H/f, W/f)
        timesteps = loop.schedule(sched, c.steps, self.bundle.device)
        shape = (c.num_images, m.latent_channels, height // f, width // f)
        latents = loop.noise(shape, gen, self.bundle) * sched.init_noise_sigma
        # 4. Denoise, decode
        latents = loop.denoise(self.bundle, sched, loop.LoopInputs(latents, timesteps, guidance),
                               generator=gen, eta=c.eta, callback=callback)
        return TaskResult(loop.decode(self.bundle, latents), self.metadata(c, width, height))
