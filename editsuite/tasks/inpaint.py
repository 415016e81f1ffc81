"""Inpaint: repaint where the mask is white; everything outside the (blurred) mask stays the original's."""

from __future__ import annotations

import dataclasses

import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.core.schedulers import INPAINT_FIXES
from editsuite.errors import UserError
from editsuite.imaging.io import open_image, open_mask
from editsuite.tasks import params as P
from editsuite.tasks.base import Task, TaskResult
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


@dataclasses.dataclass(frozen=True)
class MaskedEdit:
    """What the inpainting core repaints: `mask` drives the model (white = repaint); `paste` (None: no
    paste-back) lays the result over `image`, 0 keeping the original's pixel exactly. `crop_padding` works on
    the padded mask box at the model's resolution ("only masked"); `width`/`height` set the work size."""

    image: PIL.Image.Image
    mask: PIL.Image.Image
    paste: PIL.Image.Image | None
    crop_padding: int | None = None
    width: int | None = None
    height: int | None = None


def repaint(task: Task, edit: MaskedEdit, v, callback, extra: dict) -> TaskResult:
    """The inpainting core Inpaint and Outpaint share (`v`: the run's checked values)."""
    b, m = task.bundle, task.bundle.manifest
    f = m.vae_scale_factor
    image, mask = edit.image, edit.mask
    # 1. Work size and crop ("only masked" works on the padded mask box at the model's resolution)
    proc = loop.image_processor(b)
    mask_proc = loop.image_processor(b, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    crop, mode = None, "default"
    if edit.crop_padding is not None:
        w, h = edit.width or m.native_resolution, edit.height or m.native_resolution
        crop, mode = mask_proc.get_crop_region(mask, w, h, pad=edit.crop_padding), "fill"
    else:
        w, h = work_size(image, edit.width, edit.height, f)
    task.check_output(max(w, image.width), max(h, image.height), v.num_images)
    # SDXL: the time ids as StableDiffusionXLInpaintPipeline makes them (its img2img rule, at the work size)
    c, guidance, sched, gen = task.start(v, time_ids=task.size_conditioning(v, w, h, "img2img"))
    meta = task.metadata(c, w, h, strength=v.strength, **extra, crop=list(crop) if crop else None,
                         **task.size_conditioning_settings(v))
    timesteps = loop.schedule(sched, c.steps, b.device, v.strength)
    if len(timesteps) == 0:  # strength too low for a single step: nothing changes
        return TaskResult([image.copy() for _ in range(c.num_images)], {**meta, "steps_run": 0})
    pixels = proc.preprocess(image, height=h, width=w, crops_coords=crop, resize_mode=mode).float()
    mask_t = mask_proc.preprocess(mask, height=h, width=w, crops_coords=crop, resize_mode=mode)
    # 2. Latents; the random draws come in diffusers' order: image encode, noise, masked-image encode
    n, nine = c.num_images, m.kind is ModelKind.INPAINTING
    image_latents = None
    if not nine or v.strength < 1.0:
        image_latents = loop.encode_image(b, pixels, gen).contiguous()  # diffusers' repeat copies it contiguous
    noise = loop.noise((n, m.latent_channels, h // f, w // f), gen, b)
    if v.strength == 1.0:
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
    # 3. Denoise, decode, paste over the original
    out = loop.decode(b, loop.denoise(b, sched, inputs, generator=gen, eta=c.eta, callback=callback))
    if edit.paste is None:
        return TaskResult(out, meta)
    if crop is None:
        out = restore_size(out, image.size)
    return TaskResult([proc.apply_overlay(edit.paste, image, o, crop) for o in out], meta)


class Inpaint(Task):
    name = "inpaint"
    summary = "Repaint the white part of a mask; everything else stays as it was."
    kinds = (ModelKind.BASE, ModelKind.INPAINTING)
    inputs = ("image", "mask")
    scheduler_fixes = INPAINT_FIXES
    params = (
        *P.COMMON, P.strength(1.0),
        P.Param("mask_blur", int, 0, "Blur the mask edge by this many pixels (a soft paste-back).", low=0),
        P.Param("only_masked", bool, False, "Work on the padded mask box at the model's resolution, then paste "
                "back."),
        P.Param("padding", int, 32, "Pixels around the mask box with --only-masked.", low=0),
        P.Param("invert_mask", bool, False, "Black = repaint."),
        P.Param("resize_mask", bool, False, "Stretch a mask of another size to the image."),
        P.Param("overlay", bool, True, "Paste the result over the original outside the mask (False: the model's "
                "raw output, as diffusers returns it).", cli=False),
        *P.size_params("default: the input's, rounded"), *P.SDXL_CONDITIONING,
    )

    def _run(self, image, mask, *, v, callback) -> TaskResult:
        # 1. Open the inputs; the mask fits the image
        image = open_image(image)
        mask = checked_mask(image, open_mask(mask), resize_mask=v.resize_mask, invert_mask=v.invert_mask)
        # 2. A blurred mask feathers the paste-back; the model sees it binarised at 0.5, as diffusers does
        if v.mask_blur:
            mask = loop.image_processor(self.bundle).blur(mask, v.mask_blur)
        edit = MaskedEdit(image, mask, mask if v.overlay else None, v.padding if v.only_masked else None,
                          v.width, v.height)
        extra = dict(mask_blur=v.mask_blur, only_masked=v.only_masked, padding=v.padding, invert_mask=v.invert_mask,
                     overlay=v.overlay)
        return repaint(self, edit, v, callback, extra)
