"""Outpaint: extend the canvas on any side and fill the new area; the original region is kept exactly."""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image

from editsuite.bundle.manifest import ModelKind
from editsuite.core.schedulers import INPAINT_FIXES
from editsuite.errors import UserError
from editsuite.imaging.io import open_image
from editsuite.tasks import params as P
from editsuite.tasks.base import Task, TaskResult
from editsuite.tasks.inpaint import MaskedEdit, repaint


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


SIDES = ("left", "right", "top", "bottom")


class Outpaint(Task):
    name = "outpaint"
    summary = "Extend pictures on any side and fill the new area."
    kinds = (ModelKind.BASE, ModelKind.INPAINTING)
    inputs = ("image",)
    scheduler_fixes = INPAINT_FIXES
    params = (
        *P.COMMON,
        *(P.Param(side, int, 0, f"Pixels to add {where}.", low=0) for side, where in zip(
            SIDES, ("on the left", "on the right", "on top", "at the bottom"))),
        P.Param("expand", int, 0, "Pixels to add on every side (instead of the four above).", low=0),
        P.Param("feather", int, 16, "Fade the new area in over this many pixels from the edge.", low=0),
        P.strength(1.0), *P.SDXL_CONDITIONING,
    )

    @classmethod
    def sides(cls, values: dict) -> dict[str, int]:
        """The pixels added on each side: `expand` on all four, or each side's own."""
        expand = values.get("expand", 0)
        return {s: expand for s in SIDES} if expand else {s: values.get(s, 0) for s in SIDES}

    @classmethod
    def check_together(cls, values: dict) -> None:
        if values["expand"] and any(values[s] for s in SIDES):
            raise UserError("give either --expand or --left/--right/--top/--bottom, not both")
        if not any(cls.sides(values).values()):
            raise UserError("nothing to extend: give --left, --right, --top or --bottom (or --expand) in pixels")

    @classmethod
    def output_size(cls, args: dict, image_size: tuple[int, int]) -> tuple[int, int]:
        w, h = image_size
        sides = cls.sides(args)
        return w + sides["left"] + sides["right"], h + sides["top"] + sides["bottom"]

    def _run(self, image, *, v, callback) -> TaskResult:
        image = open_image(image)
        self.check_output(*self.output_size(vars(v), image.size), v.num_images)  # before the canvas is made
        # the canvas and masks, then the inpainting core
        sides = self.sides(vars(v))
        canvas, mask, paste = extend_canvas(image, **sides, feather=v.feather)
        return repaint(self, MaskedEdit(canvas, mask, paste), v, callback,
                       dict(**sides, feather=v.feather, input_size=[image.width, image.height]))
