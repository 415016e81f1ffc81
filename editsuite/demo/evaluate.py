"""Read a picture of the demo world back: background colour, and each object's colour and shape.

Deterministic OpenCV/NumPy: every pixel takes the nearest named colour; the background is the commonest
colour on the border; each other colour's connected regions are objects (mixed edge pixels belong to
none). An object's silhouette is taken at half level between its colour and the background's, and its
shape is the ideal circle, square or triangle in the silhouette's bounding box that overlaps it best
(intersection over union).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import PIL.Image

from editsuite.demo.scenes import COLOURS, SHAPES

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], np.float32)


@dataclasses.dataclass(frozen=True)
class Found:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # x, y, w, h
    area: int
    fit: float  # IoU with the ideal shape


@dataclasses.dataclass(frozen=True)
class Analysis:
    background: str
    objects: tuple[Found, ...]


def labels(image, max_distance: float = 70.0) -> np.ndarray:
    """(H, W) index of the nearest named colour of each pixel; -1 where no named colour is within
    `max_distance` (RGB, Euclidean): the mixed pixels of antialiased or blurred edges."""
    px = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, np.float32)
    d = ((px[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    lab = d.argmin(-1)
    lab[np.take_along_axis(d, lab[..., None], -1)[..., 0] > max_distance**2] = -1
    return lab


def _ideal(shape: str, w: int, h: int) -> np.ndarray:
    """The ideal shape filling a w x h box, tested at pixel centres."""
    y, x = np.mgrid[0:h, 0:w] + 0.5
    u, v = x / w, y / h  # 0..1 across the box
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    return np.abs(u - 0.5) <= v / 2  # upright triangle: apex at the top centre, base along the bottom


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """A region's (h, w) boolean mask, cropped to its box -> (best shape, its IoU)."""
    h, w = mask.shape
    best = ("square", -1.0)
    for shape in SHAPES:
        ideal = _ideal(shape, w, h)
        iou = (ideal & mask).sum() / max(1, (ideal | mask).sum())
        if iou > best[1]:
            best = (shape, float(iou))
    return best


def _half_level_mask(px: np.ndarray, box, bg: np.ndarray, fg: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The object's silhouette at half level: pixels in `box` closer to its colour than to the background's
    along the line between the two (where a blurred or antialiased edge is 50 % through), kept where
    connected to `seed`. Cropped to its own bounding box."""
    x, y, bw, bh = box
    d = fg - bg
    t = ((px[y:y + bh, x:x + bw] - bg) @ d) / max(float(d @ d), 1e-6)
    m = (t > 0.5).astype(np.uint8)
    n, comp = cv2.connectedComponents(m, connectivity=4)
    keep = np.isin(comp, np.unique(comp[seed & (comp > 0)]))
    ys, xs = np.nonzero(keep)
    if len(ys) == 0:
        return seed
    return keep[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def analyse(image, *, min_area: float = 0.012) -> Analysis:
    """Background colour and objects (largest first) of a picture of the demo world."""
    px = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, np.float32)
    lab = labels(px)
    h, w = lab.shape
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    bg = int(np.bincount(border[border >= 0] if (border >= 0).any() else [0], minlength=len(_NAMES)).argmax())
    found = []
    for k in range(len(_NAMES)):
        if k == bg:
            continue
        m = (lab == k).astype(np.uint8)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=4)
        for i in range(1, n):
            x, y, bw, bh, area = (int(v) for v in stats[i])
            if area < min_area * h * w:
                continue
            # look at the region's box grown by 2 px, where its blurred edge lies
            x0, y0, x1, y1 = max(0, x - 2), max(0, y - 2), min(w, x + bw + 2), min(h, y + bh + 2)
            seed = comp[y0:y1, x0:x1] == i
            silhouette = _half_level_mask(px, (x0, y0, x1 - x0, y1 - y0), _PALETTE[bg], _PALETTE[k], seed)
            shape, fit = classify_shape(silhouette)
            found.append(Found(_NAMES[k], shape, (x, y, bw, bh), area, fit))
    found.sort(key=lambda f: -f.area)
    return Analysis(_NAMES[bg], tuple(found))


def score(analysis: Analysis, spec: dict) -> dict[str, float]:
    """How well a picture matches a parsed caption: background right (0/1), and the fraction of the
    caption's objects whose colour is present, and whose colour and shape are present together."""
    objs = spec["objects"]
    colour_ok = sum(any(f.colour == o["colour"] for f in analysis.objects) for o in objs)
    shape_ok = sum(any(f.colour == o["colour"] and f.shape == o["shape"] for f in analysis.objects) for o in objs)
    return {"background": float(analysis.background == spec["background"]),
            "colour": colour_ok / len(objs), "shape": shape_ok / len(objs)}
