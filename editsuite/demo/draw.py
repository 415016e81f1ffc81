"""Draw a picture of the demo world from a caption: `python -m editsuite.demo.draw CAPTION -o FILE`.

Sizes and places the caption leaves out default to large, and to the centre (one object) or left and
right (two). `--mask K` draws instead the inpainting mask over object K's box (white = repaint).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image

from editsuite.demo.scenes import PLACES, SIZES, Obj, Scene, parse, render


def scene_from_caption(caption: str) -> Scene:
    spec = parse(caption)
    defaults = ["centre"] if len(spec["objects"]) == 1 else ["left", "right"]
    objs = tuple(Obj(o["colour"], o["shape"], o["size"] or "large", o["place"] or d,
                     say_size=o["size"] is not None, say_place=o["place"] is not None)
                 for o, d in zip(spec["objects"], defaults))
    return Scene(spec["background"], objs)


def object_mask(scene: Scene, index: int, size: int, margin: float = 0.06) -> np.ndarray:
    """(size, size) uint8 mask, 255 over object `index`'s box grown by `margin` of the side."""
    o = scene.objects[index]
    cx, cy = (PLACES[o.place][0] + o.dx) * size, (PLACES[o.place][1] + o.dy) * size
    half = (SIZES[o.size] / 2 + margin) * size
    m = np.zeros((size, size), np.uint8)
    m[max(0, int(cy - half)):int(cy + half) + 1, max(0, int(cx - half)):int(cx + half) + 1] = 255
    return m


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("caption")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--mask", type=int, default=None, metavar="K", help="draw the mask over object K (0-based)")
    args = ap.parse_args(argv)
    scene = scene_from_caption(args.caption)
    pixels = object_mask(scene, args.mask, args.size) if args.mask is not None else render(scene, args.size)
    PIL.Image.fromarray(pixels).save(args.output)


if __name__ == "__main__":
    main()
