"""Img2Img: repaint a picture guided by a prompt; `strength` is how much of the schedule to run."""

from __future__ import annotations

import PIL.Image
import torch

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.imaging.io import open_image
from editsuite.tasks import params as P
from editsuite.tasks.base import Common, Task, TaskResult, round_to


def work_size(image: PIL.Image.Image, width: int | None, height: int | None, multiple: int) -> tuple[int, int]:
    """The size the model works at: the given one, else the image's rounded to the VAE factor."""
    return (width or round_to(image.width, multiple), height or round_to(image.height, multiple))


def restore_size(images: list[PIL.Image.Image], size: tuple[int, int]) -> list[PIL.Image.Image]:
    """Back to the input's size when the work size had to be rounded (Lanczos)."""
    return [im if im.size == size else im.resize(size, PIL.Image.LANCZOS) for im in images]


def img2img_latents(task: Task, pixels: torch.Tensor, c: Common, guidance, sched, gen, strength: float,
                    callback=None) -> torch.Tensor | None:
    """Encode, noise to the strength's timestep, denoise. None when no step would run (keep the input)."""
    b = task.bundle
    timesteps = loop.schedule(sched, c.steps, b.device, strength)
    if len(timesteps) == 0:
        return None
    init = loop.encode_image(b, pixels, gen)
    latents = sched.add_noise(init, loop.noise(init.shape, gen, b), timesteps[:1].repeat(c.num_images))
    return loop.denoise(b, sched, loop.LoopInputs(latents, timesteps, guidance), generator=gen, eta=c.eta,
                        callback=callback)


class Img2Img(Task):
    name = "img2img"
    summary = "Repaint pictures guided by a prompt."
    kinds = (ModelKind.BASE,)
    inputs = ("image",)
    params = (*P.COMMON, P.strength(0.75), *P.size_params("default: the input's, rounded"), *P.SDXL_CONDITIONING)

    def _run(self, image, *, v, callback) -> TaskResult:
        # 1. Open the input; the work size
        f = self.bundle.manifest.vae_scale_factor
        image = open_image(image)
        w, h = work_size(image, v.width, v.height, f)
        self.check_output(w, h, v.num_images)
        # 2. Prompt, scheduler, generators
        c, guidance, sched, gen = self.start(v, time_ids=self.size_conditioning(v, w, h, "img2img"))
        meta = self.metadata(c, w, h, strength=v.strength, **self.size_conditioning_settings(v))
        # 3. Encode, noise, denoise, decode (strength 0 keeps the input exactly)
        pixels = loop.image_processor(self.bundle).preprocess(image, height=h, width=w)
        latents = img2img_latents(self, pixels, c, guidance, sched, gen, v.strength, callback) if v.strength > 0 \
            else None
        if latents is None:
            return TaskResult([image.copy() for _ in range(c.num_images)], {**meta, "steps_run": 0})
        out = loop.decode(self.bundle, latents)
        return TaskResult(out if v.width or v.height else restore_size(out, image.size), meta)
