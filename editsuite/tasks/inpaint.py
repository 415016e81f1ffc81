"""Inpaint: repaint where the mask is white; everything outside the (blurred) mask stays the original's."""

from __future__ import annotations

import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.core.schedulers import INPAINT_FIXES
from editsuite.errors import UserError
from editsuite.imaging.io import open_image, open_mask
from editsuite.tasks.base import (DEFAULT_GUIDANCE, DEFAULT_STEPS, Common, Task, TaskResult, check_size,
                                  check_strength)
from editsuite.tasks.img2img import restore_size, work_size


def checked_mask(image: PIL.Image.Image, mask: PIL.Image.Image, *, resize_mask: bool = False,
                 invert_mask: bool = False) -> PIL.Image.Image:
    """The mask ('L', white = repaint) made to fit `image`, or a UserError saying why it cannot."""
    if mask.size != image.size:
        if not resize_mask:
            raise UserError(
                f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; give a "
                "mask of the same size, or pass --resize-mask to stretch it to the image")
        mask = mask.resize(image.size, PIL.Image.LANCZOS)
    if invert_mask:
        mask = PIL.ImageOps.invert(mask)
    if mask.getextrema()[1] < 128:
        raise UserError("the mask is empty (no white pixels): white marks what to repaint; check the mask "
                        "file, or pass --invert-mask if black marks it")
    return mask


class Inpaint(Task):
    name = "inpaint"
    kinds = (ModelKind.BASE, ModelKind.INPAINTING)
    scheduler_fixes = INPAINT_FIXES

    def run(self, image, mask, prompt: str = "", *, strength: float = 1.0, mask_blur: int = 0,
            only_masked: bool = False, padding: int = 32, invert_mask: bool = False, resize_mask: bool = False,
            overlay: bool = True, width: int | None = None, height: int | None = None, negative_prompt: str = "",
            steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, seed: int | None = None,
            scheduler: str | None = None, num_images: int = 1, eta: float = 0.0,
            callback: loop.StepCallback | None = None) -> TaskResult:
        # 1. Check inputs
        strength = check_strength(strength)
        if mask_blur < 0 or padding < 0:
            raise UserError(f"mask blur and padding must be 0 or more pixels (got {mask_blur} and {padding})")
        image = open_image(image)
        mask = checked_mask(image, open_mask(mask), resize_mask=resize_mask, invert_mask=invert_mask)
        # 2. A blurred mask feathers the paste-back; the model sees it binarised at 0.5, as diffusers does
        if mask_blur:
            mask = loop.image_processor(self.bundle).blur(mask, mask_blur)
        common = Common(prompt, negative_prompt, steps, guidance_scale, seed, scheduler, num_images, eta)
        extra = dict(strength=strength, mask_blur=mask_blur, only_masked=only_masked, padding=padding,
                     invert_mask=invert_mask, overlay=overlay)
        return self.generate(image, mask, mask, common, strength=strength, crop_padding=padding if only_masked else None,
                             overlay=overlay, width=width, height=height, callback=callback, extra=extra)

    def generate(self, image: PIL.Image.Image, mask: PIL.Image.Image, overlay_mask: PIL.Image.Image, common: Common,
                 *, strength: float, crop_padding: int | None, overlay: bool, width: int | None, height: int | None,
                 callback, extra: dict) -> TaskResult:
        """The inpainting core Inpaint and Outpaint share: `mask` drives the model (white = repaint), and
        `overlay_mask` pastes the result over the original (0 keeps the original's pixel exactly)."""
        b, m = self.bundle, self.bundle.manifest
        f = m.vae_scale_factor
        width, height = check_size(width, "width", f), check_size(height, "height", f)
        # 3. Work size and crop ("only masked" works on the padded mask box at the model's resolution)
        proc = loop.image_processor(b)
        mask_proc = loop.image_processor(b, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        crop, mode = None, "default"
        if crop_padding is not None:
            w, h = width or m.native_resolution, height or m.native_resolution
            crop, mode = mask_proc.get_crop_region(mask, w, h, pad=crop_padding), "fill"
        else:
            w, h = work_size(image, width, height, f)
        self.check_output(max(w, image.width), max(h, image.height), common.num_images)
        c, guidance, sched, gen = self.start(common)
        meta = self.metadata(c, w, h, **extra, crop=list(crop) if crop else None)
        timesteps = loop.schedule(sched, c.steps, b.device, strength)
        if len(timesteps) == 0:  # strength too low for a single step: nothing changes
            return TaskResult([image.copy() for _ in range(c.num_images)], {**meta, "steps_run": 0})
        pixels = proc.preprocess(image, height=h, width=w, crops_coords=crop, resize_mode=mode).float()
        mask_t = mask_proc.preprocess(mask, height=h, width=w, crops_coords=crop, resize_mode=mode)
        # 4. Latents; the random draws come in diffusers' order: image encode, noise, masked-image encode
        n, nine = c.num_images, m.kind is ModelKind.INPAINTING
        image_latents = None
        if not nine or strength < 1.0:
            image_latents = loop.encode_image(b, pixels, gen).contiguous()  # diffusers' repeat copies it contiguous
        noise = loop.noise((n, m.latent_channels, h // f, w // f), gen, b)
        if strength == 1.0:
            latents = noise * sched.init_noise_sigma
        else:
            latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(n))
        mask_lat = F.interpolate(mask_t, size=(h // f, w // f)).to(b.device, b.dtype).repeat(n, 1, 1, 1)
        # diffusers encodes the masked image for 4-channel models too; drawn here to keep the seed's order.
        # Each image's own generator draws its sample, so image i is reproduced alone by seed + i (diffusers
        # draws this one sample from the first generator for the whole batch: images after the first differ)
        masked_lat = loop.encode_image(b, pixels * (mask_t < 0.5), gen)
        inputs = loop.LoopInputs(latents, timesteps, guidance)
        if nine:
            rep = 2 if guidance.do_cfg else 1
            inputs.extra_channels = torch.cat([mask_lat.repeat(rep, 1, 1, 1), masked_lat.repeat(rep, 1, 1, 1)], dim=1)
        else:
            inputs.known = loop.KnownRegion(image_latents, mask_lat, noise)
        # 5. Denoise, decode, paste over the original
        out = loop.decode(b, loop.denoise(b, sched, inputs, generator=gen, eta=c.eta, callback=callback))
        if not overlay:
            return TaskResult(out, meta)
        if crop is None:
            out = restore_size(out, image.size)
        return TaskResult([proc.apply_overlay(overlay_mask, image, o, crop) for o in out], meta)

