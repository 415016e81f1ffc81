"""Outpaint: extend the canvas on any side and fill the new area; the original region is kept exactly."""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image

from editsuite.core import loop
from editsuite.errors import UserError
from editsuite.imaging.io import open_image
from editsuite.tasks.base import DEFAULT_GUIDANCE, DEFAULT_STEPS, Common, TaskResult, check_strength
from editsuite.tasks.inpaint import Inpaint


def extend_canvas(image: PIL.Image.Image, left: int, right: int, top: int, bottom: int, feather: int):
    """-> (canvas, model mask, overlay mask), all of the new size.

    canvas: the original, its edge pixels stretched outwards (a neutral start the seam can blend into);
    model mask: 255 on the new area; overlay mask: 0 on the original, rising to 255 over `feather`
    pixels outwards, so the generated area fades in from the original's edge.
    """
    rgb = np.asarray(image)
    canvas = cv2.copyMakeBorder(rgb, top, bottom, left, right, cv2.BORDER_REPLICATE)
    new = np.full(canvas.shape[:2], 255, np.uint8)
    new[top:top + image.height, left:left + image.width] = 0
    if feather > 0:
        # distance of each new pixel to the nearest original pixel, in pixels
        dist = cv2.distanceTransform(new, cv2.DIST_L2, 5)
        overlay = np.clip(dist / feather, 0, 1) * 255
        overlay = np.where(new > 0, np.maximum(overlay, 1), 0).round().astype(np.uint8)
    else:
        overlay = new
    return PIL.Image.fromarray(canvas), PIL.Image.fromarray(new), PIL.Image.fromarray(overlay)


class Outpaint(Inpaint):
    name = "outpaint"

    @classmethod
    def output_size(cls, args: dict, image_size: tuple[int, int]) -> tuple[int, int]:
        w, h = image_size
        return w + args.get("left", 0) + args.get("right", 0), h + args.get("top", 0) + args.get("bottom", 0)

    def run(self, image, prompt: str = "", *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
            feather: int = 16, strength: float = 1.0, negative_prompt: str = "", steps: int = DEFAULT_STEPS,
            guidance_scale: float = DEFAULT_GUIDANCE, seed: int | None = None, scheduler: str | None = None,
            num_images: int = 1, eta: float = 0.0, callback: loop.StepCallback | None = None) -> TaskResult:
        # 1. Check inputs
        sides = dict(left=left, right=right, top=top, bottom=bottom)
        if any(v < 0 for v in sides.values()) or feather < 0:
            raise UserError(f"outpaint sizes and feather must be 0 or more pixels (got {sides}, feather {feather})")
        if not any(sides.values()):
            raise UserError("nothing to extend: give --left, --right, --top or --bottom (or --expand) in pixels")
        image = open_image(image)
        self.check_output(*self.output_size(sides, image.size), num_images)  # before the canvas is made
        # 2. Canvas and masks, then the shared inpainting core
        canvas, mask, overlay = extend_canvas(image, left, right, top, bottom, feather)
        common = Common(prompt, negative_prompt, steps, guidance_scale, seed, scheduler, num_images, eta)
        return self.generate(canvas, mask, overlay, common, strength=check_strength(strength),
                             crop_padding=None, overlay=True, width=None, height=None, callback=callback,
                             extra=dict(**sides, feather=feather, strength=strength,
                                        input_size=[image.width, image.height]))
