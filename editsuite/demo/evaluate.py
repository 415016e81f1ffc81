"""Read a picture of the demo world back, and judge it strictly against its caption.

Reading (deterministic OpenCV/NumPy): every pixel takes the nearest named colour; the background is the
commonest colour on the border, if it covers half of it ("none" otherwise); each other colour's connected
regions are objects (mixed edge pixels belong to none, and a thin outline is another object's blended edge,
not an object), and so is a region of no named colour that is not such a blend (colour "other", a blob).
An object's silhouette is taken at half level between its colour and the background's. Its shape is the template
(circle, square or upright triangle filling the silhouette's box) that overlaps it best, and only if it is
a shape of the world at all: a silhouette that fits no template well (FIT_MIN, the
intersection over union), whose box is not square (ASPECT_MAX: every shape is drawn in a square box, so a
2:1 ellipse is not a circle), that has dents (SOLIDITY_MIN: the world's shapes are convex) or whose edge is
blurred (EDGE_MAX: the mean width of its edge, where the colour goes from 10 % to 90 % of the way from the
background's to its own) reads as "blob". A known limit: a trapezoid whose top is under about a third of
its base still fits the triangle's template (FIT_MIN 0.70), because the VAE's round trip of exact triangles
fits it no better (0.65 to 0.9): a stricter fit would fail right answers.

Judging (`judge`), per picture, each criterion 0 or 1 or a fraction of the caption's objects:
- background: the background's colour is the caption's;
- count: exactly as many objects as the caption names;
- colour: the caption's object colours are there, each as one object, and no object of another colour
  (a picture with every colour in it fails);
- shape: each named object is there once in its colour, reads as its shape (as above), and sits at the
  place and has the size the caption states, where it states them (PLACE_TOLERANCE, SIZE_TOLERANCE); any
  object beyond the caption's fails the whole picture.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import PIL.Image

from editsuite.demo.scenes import COLOURS, JITTER, PLACES, SHAPES, SIZES

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], np.float32)

# IoU with the template: exact renders >= 0.84; a diamond 0.64-0.72 (as a circle, large to small), a triangle
# upside down 0.5; a triangle's rounded corners cost more of its IoU than a circle's or square's
FIT_MIN = {"circle": 0.80, "square": 0.80, "triangle": 0.70}
ASPECT_MAX = 1.22  # the box, long side over short: exact renders <= 1.07 (through the VAE 1.20), a 5:4 box 1.25
SOLIDITY_MIN = 0.90  # area over its convex hull's: the world's shapes are convex (exact renders >= 0.95)
# px, about the 10-90 % width: exact renders' edges <= 1.1 (99th percentile); the edges of renders blurred by a
# Gaussian of sigma 0.75 / 1 / 2 px measure 2.1 / 2.7 / 5.2 (medians); the VAE's round trips 2.8 to 5.2 where
# they fail (a fifth of the txt2img prompts' pictures)
EDGE_MAX = 2.5
PLACE_TOLERANCE = JITTER + 0.06  # the centre's offset from the stated place, fraction of the side, per axis
SIZE_TOLERANCE = 0.06  # the box's side against the stated size, fraction of the side
EDGE_RING = 5  # px each side of the outline where an edge is measured
BORDER_MIN = 0.5  # the background's colour covers at least half the border; else the background is "none"
BLEND_DISTANCE = 40.0  # RGB: a pixel this near the line from the background's colour to an object's is a blend


@dataclasses.dataclass(frozen=True)
class Found:
    colour: str
    shape: str  # circle, square, triangle, or "blob" (no shape of the world)
    box: tuple[int, int, int, int]  # x, y, w, h of the silhouette, in pixels of the picture
    area: int
    fit: float  # IoU with the best template
    aspect: float = 1.0  # long side over short side of the box
    edge: float = 0.0  # mean edge width, px
    solidity: float = 1.0  # area over the convex hull's
    nearest: str = ""  # the best template, whatever the fit


@dataclasses.dataclass(frozen=True)
class Analysis:
    background: str
    objects: tuple[Found, ...]
    size: tuple[int, int] = (0, 0)  # w, h of the picture


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


def nearest_shape(mask: np.ndarray) -> tuple[str, float]:
    """A region's (h, w) boolean mask, cropped to its box -> (the template that fits best, its IoU)."""
    h, w = mask.shape
    best = ("square", -1.0)
    for shape in SHAPES:
        ideal = _ideal(shape, w, h)
        iou = (ideal & mask).sum() / max(1, (ideal | mask).sum())
        if iou > best[1]:
            best = (shape, float(iou))
    return best


def solidity(mask: np.ndarray) -> float:
    """Area over the convex hull's area (pixel centres): 1 for a convex region, less for a blob with dents."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    hull = cv2.convexHull(np.concatenate(contours))
    return float(min(1.0, mask.sum() / max(cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1, 1.0)))


def read_shape(mask: np.ndarray, edge: float = 0.0) -> tuple[str, str, float, float, float]:
    """(shape, nearest template, fit, aspect, solidity) of a silhouette cropped to its box: the shape is the
    nearest template, or "blob" where the fit, the box's aspect, dents or a blurred edge disqualify it."""
    nearest, fit = nearest_shape(mask)
    h, w = mask.shape
    aspect, dents = max(h, w) / max(1, min(h, w)), solidity(mask)
    blob = bool(broken_rules(nearest, fit, aspect, dents, edge))
    return ("blob" if blob else nearest), nearest, fit, aspect, dents


def broken_rules(nearest: str, fit: float, aspect: float, dents: float, edge: float) -> list[str]:
    """The rules (fit, aspect, dents, edge) by which a silhouette nearest to `nearest` reads as a blob."""
    rules = {"fit": fit < FIT_MIN[nearest], "aspect": aspect > ASPECT_MAX, "dents": dents < SOLIDITY_MIN,
             "edge": edge > EDGE_MAX}
    return [name for name, broken in rules.items() if broken]


def classify_shape(mask: np.ndarray, edge: float = 0.0) -> tuple[str, float]:
    """(shape, fit), as read_shape reads them."""
    shape, _, fit, _, _ = read_shape(mask, edge)
    return shape, fit


def _silhouette(px: np.ndarray, lab: np.ndarray, box, bg: int, fg: int, seed: np.ndarray):
    """The object's silhouette at half level in `box` (pixels closer to its colour than to the background's
    along the line between the two, connected to `seed`), its box within `box`, and its edge width: the
    pixels within 3 px of the silhouette's outline between 10 % and 90 % of the way (and of no third named
    colour), over the outline's length."""
    x, y, bw, bh = box
    d = _PALETTE[fg] - _PALETTE[bg]
    rel = px[y:y + bh, x:x + bw] - _PALETTE[bg]
    t = (rel @ d) / max(float(d @ d), 1e-6)
    off_line = np.linalg.norm(rel - t[..., None] * d, axis=-1)  # a blend of other colours lies off the line
    sub = lab[y:y + bh, x:x + bw]
    ours = (sub == bg) | (sub == fg) | ((sub == -1) & (off_line < 40))  # not a neighbour's colour or edge
    m = ((t > 0.5) & ours).astype(np.uint8)
    _, comp = cv2.connectedComponents(m, connectivity=4)
    keep = np.isin(comp, np.unique(comp[seed & (comp > 0)])) & (comp > 0)
    if not keep.any():
        keep = seed
    k8 = keep.astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    ring = (cv2.dilate(k8, kernel, iterations=EDGE_RING) > 0) & ~(cv2.erode(k8, kernel, iterations=EDGE_RING) > 0)
    mixed = ring & (t > 0.1) & (t < 0.9) & ours
    contours, _ = cv2.findContours(k8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = sum(cv2.arcLength(c, True) for c in contours)
    ys, xs = np.nonzero(keep)
    inner = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    return keep[ys.min():ys.max() + 1, xs.min():xs.max() + 1], inner, float(mixed.sum()) / max(outline, 1.0)


def analyse(image, *, min_area: float = 0.012) -> Analysis:
    """Background colour and objects (largest first) of a picture of the demo world."""
    px = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, np.float32)
    lab = labels(px)
    h, w = lab.shape
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    counts = np.bincount(border[border >= 0], minlength=len(_NAMES))
    bg = int(counts.argmax())  # objects are read against it even where it is no background (below)
    background = _NAMES[bg] if counts[bg] >= BORDER_MIN * border.size else "none"
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
            region = (comp[y:y + bh, x:x + bw] == i).astype(np.uint8)
            if cv2.erode(region, np.ones((3, 3), np.uint8)).sum() < 0.3 * area:
                continue  # a thin outline: the blended edge of another object (red on blue reads as purple)
            # look at the region's box grown by 4 px, where its blurred edge lies
            x0, y0, x1, y1 = max(0, x - 4), max(0, y - 4), min(w, x + bw + 4), min(h, y + bh + 4)
            seed = comp[y0:y1, x0:x1] == i
            silhouette, (sx, sy, sw, sh), edge = _silhouette(px, lab, (x0, y0, x1 - x0, y1 - y0), bg, k, seed)
            shape, nearest, fit, aspect, dents = read_shape(silhouette, edge)
            found.append(Found(_NAMES[k], shape, (x0 + sx, y0 + sy, sw, sh), area, fit, aspect, edge, dents,
                               nearest))
    found += _foreign(px, lab, bg, {_NAMES.index(f.colour) for f in found}, min_area)
    found.sort(key=lambda f: -f.area)
    return Analysis(background, tuple(found), (w, h))


def _foreign(px: np.ndarray, lab: np.ndarray, bg: int, colours: set[int], min_area: float) -> list[Found]:
    """Regions of no named colour ("other", a blob): pixels far from every named colour that are not a blend
    of the background and one of the objects' colours within EDGE_RING px of it (a blurred edge), in a region
    at least `min_area` of the picture and more than an outline (it survives a 3x3 erosion)."""
    h, w = lab.shape
    odd = lab == -1
    rel = px - _PALETTE[bg]
    for k in colours:  # take out the blends: near an object, pixels near the line from the background to it
        d = _PALETTE[k] - _PALETTE[bg]
        t = np.clip((rel @ d) / max(float(d @ d), 1e-6), 0, 1)
        near = cv2.dilate((lab == k).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=EDGE_RING) > 0
        odd &= ~near | (np.linalg.norm(rel - t[..., None] * d, axis=-1) >= BLEND_DISTANCE)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(odd.astype(np.uint8), connectivity=4)
    out = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        region = (comp[y:y + bh, x:x + bw] == i).astype(np.uint8)
        if area >= min_area * h * w and cv2.erode(region, np.ones((3, 3), np.uint8)).sum() >= 0.3 * area:
            out.append(Found("other", "blob", (x, y, bw, bh), area, 0.0))
    return out


def object_faults(found: Found, want: dict, size: tuple[int, int]) -> dict[str, str]:
    """Why `found` is not the caption's object `want` ({colour, shape, size, place}), by criterion ("shape",
    "place", "size": what is wrong): empty where it is that object."""
    faults = {}
    if found.shape != want["shape"]:
        faults["shape"] = (f"reads as {found.shape} (nearest {found.nearest}, fit {found.fit:.2f}, aspect "
                           f"{found.aspect:.2f}, solidity {found.solidity:.2f}, edge {found.edge:.1f} px)")
    w, h = size
    x, y, bw, bh = found.box
    if want.get("place"):
        px, py = PLACES[want["place"]]
        dx, dy = (x + bw / 2) / w - px, (y + bh / 2) / h - py
        if max(abs(dx), abs(dy)) > PLACE_TOLERANCE:
            faults["place"] = f"not {want['place']} (centre off by {dx:+.2f}, {dy:+.2f} of the side)"
    if want.get("size"):
        side = max(bw / w, bh / h)
        if abs(side - SIZES[want["size"]]) > SIZE_TOLERANCE:
            faults["size"] = f"not {want['size']} (side {side:.2f} of the picture's)"
    return faults


def judge(analysis: Analysis, spec: dict) -> dict[str, float]:
    """The strict criteria of a picture against its parsed caption (see the module's docstring)."""
    wanted = spec["objects"]
    named = {o["colour"] for o in wanted}
    by_colour: dict[str, list[Found]] = {}
    for f in analysis.objects:
        by_colour.setdefault(f.colour, []).append(f)
    foreign = any(c not in named for c in by_colour)
    extra = len(analysis.objects) > len(wanted)
    colour_ok = shape_ok = 0
    for o in wanted:
        mine = by_colour.get(o["colour"], [])
        if len(mine) == 1:
            colour_ok += 1
            shape_ok += not object_faults(mine[0], o, analysis.size)
    return {"background": float(analysis.background == spec["background"]),
            "colour": 0.0 if foreign else colour_ok / len(wanted),
            "shape": 0.0 if extra else shape_ok / len(wanted),
            "count": float(len(analysis.objects) == len(wanted))}
