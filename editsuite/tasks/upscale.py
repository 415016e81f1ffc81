"""Upscale: the x4 upscaler model as diffusers runs it, or the tiled "SD upscale" with any base model."""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import torch

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.errors import UserError
from editsuite.imaging.io import open_image
from editsuite.tasks import params as P
from editsuite.tasks.base import Task, TaskResult
from editsuite.tasks.img2img import img2img_latents


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), neighbours overlapping by >= `overlap`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def tile_weights(h: int, w: int, overlap: int, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """(h, w) blend weights: a linear ramp over `overlap` pixels on the sides that meet another tile
    (top, bottom, left, right), 1 elsewhere. Overlapping ramps sum to a smooth, seamless crossfade."""
    def ramp(n: int, lo: bool, hi: bool) -> np.ndarray:
        r = np.ones(n, np.float64)
        k = min(overlap, n)
        if k > 0:
            up = (np.arange(k) + 0.5) / k
            if lo:
                r[:k] = np.minimum(r[:k], up)
            if hi:
                r[n - k:] = np.minimum(r[n - k:], up[::-1])
        return r

    top, bottom, left, right = edges
    return np.outer(ramp(h, top, bottom), ramp(w, left, right))


class Upscale(Task):
    name = "upscale"
    summary = "Make pictures larger: the x4 upscaler model, or a tiled img2img pass with a base model."
    kinds = (ModelKind.UPSCALER, ModelKind.BASE)
    inputs = ("image",)
    params = (
        dataclasses.replace(P.PROMPT, help="What to paint (optional).", cli_required=False),
        *(p for p in P.COMMON if p.name not in ("prompt", "guidance_scale")),
        dataclasses.replace(P.by_name(P.COMMON)["guidance_scale"], default=None, optional=True,
                            help="Classifier-free guidance scale (default 9 for the x4 upscaler, else 7.5)."),
        P.Param("scale", float, 4.0, "Upscaling factor.", low=1, high=8),
        P.Param("noise_level", int, 20, "x4 upscaler: noise added to the low-res input.", low=0),
        P.Param("tile", int, None, "Tile size for the tiled upscale (default: the model's resolution).", optional=True,
                low=1),
        P.Param("overlap", int, None, "Overlap between tiles, in pixels (default: 1/8 of the tile).", optional=True,
                low=0),
        P.strength(0.3),
    )

    @classmethod
    def output_size(cls, args: dict, image_size: tuple[int, int]) -> tuple[int, int]:
        scale = args.get("scale", 4)  # checked values (params)
        return round(image_size[0] * scale), round(image_size[1] * scale)

    def _run(self, image, *, v, callback) -> TaskResult:
        image = open_image(image)
        self.check_output(*self.output_size(vars(v), image.size), v.num_images)
        x4 = self.bundle.kind is ModelKind.UPSCALER
        if v.guidance_scale is None:
            v.guidance_scale = 9.0 if x4 else P.DEFAULT_GUIDANCE
        if x4:
            return self._x4(image, v, callback)
        return self._tiled(image, v, callback)

    def _x4(self, image, v, callback) -> TaskResult:
        """diffusers' StableDiffusionUpscalePipeline: latents at the low-res size, the noised low-res image
        concatenated on channels, `class_labels = noise_level`; decoded 4x larger."""
        b, m = self.bundle, self.bundle.manifest
        scale, noise_level = v.scale, v.noise_level
        if not 0 <= noise_level <= m.max_noise_level:
            raise UserError(f"noise level must be between 0 and {m.max_noise_level} (got {noise_level})")
        c, guidance, sched, gen = self.start(v, fixes=())  # diffusers' x4 pipeline corrects nothing
        low = loop.image_processor(b, resample="bicubic").preprocess(image).to(b.device, b.dtype)
        timesteps = loop.schedule(sched, c.steps, b.device)
        level = torch.tensor([noise_level], dtype=torch.long, device=b.device)
        # the low-res image's noise: one draw per image from its own generator, so image i is reproduced alone
        # by seed + i (diffusers draws it once, from the first generator, for the whole batch)
        low = low.repeat(c.num_images, 1, 1, 1)
        low = b.low_res_scheduler.add_noise(low, loop.noise(low.shape, gen, b), level.repeat(c.num_images))
        low = torch.cat([low] * (2 if guidance.do_cfg else 1))
        h, w = low.shape[2:]
        latents = loop.noise((c.num_images, m.latent_channels, h, w), gen, b) * sched.init_noise_sigma
        inputs = loop.LoopInputs(latents, timesteps, guidance, extra_channels=low,
                                 class_labels=torch.cat([level] * low.shape[0]))
        out = loop.decode(b, loop.denoise(b, sched, inputs, generator=gen, eta=c.eta, callback=callback))
        target = (round(image.width * scale), round(image.height * scale))
        out = [o if o.size == target else o.resize(target, PIL.Image.LANCZOS) for o in out]
        return TaskResult(out, self.metadata(c, target[0], target[1], scale=scale, noise_level=noise_level,
                                             method="x4-upscaler"))

    def _tiled(self, image, v, callback) -> TaskResult:
        """"SD upscale": Lanczos to the target size, then img2img over overlapping tiles, crossfaded."""
        b, m = self.bundle, self.bundle.manifest
        f = m.vae_scale_factor
        scale, overlap, strength = v.scale, v.overlap, v.strength
        tile = v.tile or m.native_resolution
        overlap = tile // 8 if overlap is None else overlap  # 64 px for 512 px tiles, as AUTOMATIC1111
        if tile < f or tile % f or not 0 <= overlap < tile // 2 + 1:
            raise UserError(f"tile must be a multiple of {f} and overlap between 0 and half the tile "
                            f"(got tile {tile}, overlap {overlap})")
        target = (round(image.width * scale), round(image.height * scale))
        big = image.resize(target, PIL.Image.LANCZOS)
        tw, th = min(tile, target[0] - target[0] % f), min(tile, target[1] - target[1] % f)
        # SDXL: each tile is an img2img run at the tile's size (StableDiffusionXLImg2ImgPipeline's time ids)
        c, guidance, sched, gen = self.start(v, time_ids=self.size_conditioning(v, max(tw, f), max(th, f), "img2img"))
        meta = self.metadata(c, target[0], target[1], scale=scale, tile=tile, overlap=overlap, strength=strength,
                             method="tiled-img2img")
        if strength == 0 or min(target) < f:
            return TaskResult([big.copy() for _ in range(c.num_images)], meta)
        xs, ys = tile_starts(target[0], tw, overlap), tile_starts(target[1], th, overlap)
        acc = np.zeros((c.num_images, target[1], target[0], 3))
        wsum = np.zeros((target[1], target[0], 1))
        proc = loop.image_processor(b)
        for y in ys:
            for x in xs:
                crop = big.crop((x, y, x + tw, y + th))
                sched = self.new_scheduler(c.scheduler)  # fresh per tile; the generators run on
                latents = img2img_latents(self, proc.preprocess(crop), c, guidance, sched, gen, strength, callback)
                tiles = loop.decode(b, latents) if latents is not None else [crop] * c.num_images
                wgt = tile_weights(th, tw, overlap, (y > 0, y + th < target[1], x > 0, x + tw < target[0]))[..., None]
                for i, t in enumerate(tiles):
                    acc[i, y:y + th, x:x + tw] += np.asarray(t, np.float64) * wgt
                wsum[y:y + th, x:x + tw] += wgt
        out = [PIL.Image.fromarray(np.clip(np.round(a / wsum), 0, 255).astype(np.uint8)) for a in acc]
        return TaskResult(out, {**meta, "tiles": len(xs) * len(ys), "tile_size": [tw, th]})
