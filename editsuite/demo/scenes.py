"""The demo model's world: scenes of simple shapes on a plain background, drawn exactly at any size.

Caption grammar (every caption names each object's colour and shape and the background colour):

    caption  := object " on " ARTICLE " " COLOUR " background"                  (one object)
              | object " and " object ", on " ARTICLE " " COLOUR " background"  (two objects)
    object   := ARTICLE " " [SIZE " "] COLOUR " " SHAPE [PLACE]
    ARTICLE  := "a" | "an" (before a vowel)
    SIZE     := "small" | "large"
    SHAPE    := "circle" | "square" | "triangle"
    PLACE    := " at the left" | " at the right" | " at the top" | " at the bottom" | " in the centre"
    COLOUR   := red | green | blue | yellow | white | black | orange | purple

e.g. "a red circle on a blue background",
     "a small red circle at the left and a green square, on a blue background".
A size or place the caption leaves out is drawn at random. Objects never share the background's colour,
two objects never share a colour, and they never overlap.
"""

from __future__ import annotations

import dataclasses
import re

import cv2
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.24, "large": 0.40}  # side or diameter, as a fraction of the picture's side
PLACES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
          "centre": (0.5, 0.5)}
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
JITTER = 0.05  # random shift of an object's centre, fraction of the side


def _a(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


@dataclasses.dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    place: str
    dx: float = 0.0  # jitter, fraction of the side
    dy: float = 0.0
    say_size: bool = False
    say_place: bool = False

    def phrase(self) -> str:
        words = ([self.size] if self.say_size else []) + [self.colour, self.shape]
        place = (" in the centre" if self.place == "centre" else f" at the {self.place}") if self.say_place else ""
        return f"{_a(' '.join(words))}{place}"


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def caption(self) -> str:
        if len(self.objects) == 1:
            return f"{self.objects[0].phrase()} on {_a(self.background)} background"
        return f"{self.objects[0].phrase()} and {self.objects[1].phrase()}, on {_a(self.background)} background"


def sample_scene(rng: np.random.Generator, *, two_objects: float = 0.4) -> Scene:
    names = list(COLOURS)
    bg = names[rng.integers(len(names))]
    n = 2 if rng.random() < two_objects else 1
    colours = rng.choice([c for c in names if c != bg], size=n, replace=False)
    places = PAIRS[rng.integers(len(PAIRS))] if n == 2 else (list(PLACES)[rng.integers(len(PLACES))],)
    objs = []
    for colour, place in zip(colours, places):
        objs.append(Obj(
            colour=str(colour), shape=SHAPES[rng.integers(3)], size=list(SIZES)[rng.integers(2)], place=place,
            dx=float(rng.uniform(-JITTER, JITTER)), dy=float(rng.uniform(-JITTER, JITTER)),
            say_size=bool(rng.random() < 0.5), say_place=bool(rng.random() < 0.5)))
    return Scene(bg, tuple(objs))


def _draw(canvas: np.ndarray, obj: Obj, side: int) -> None:
    cx, cy = (PLACES[obj.place][0] + obj.dx) * side, (PLACES[obj.place][1] + obj.dy) * side
    r = SIZES[obj.size] * side / 2
    colour = COLOURS[obj.colour]
    if obj.shape == "circle":
        cv2.circle(canvas, (round(cx), round(cy)), round(r), colour, -1, cv2.LINE_AA)
    elif obj.shape == "square":
        cv2.rectangle(canvas, (round(cx - r), round(cy - r)), (round(cx + r), round(cy + r)), colour, -1)
    else:  # upright triangle filling the same box
        pts = np.array([[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]], np.int32)
        cv2.fillPoly(canvas, [pts], colour, cv2.LINE_AA)


def render(scene: Scene, size: int, supersample: int = 4) -> np.ndarray:
    """The exact picture of `scene`, (size, size, 3) uint8 RGB, antialiased by supersampling."""
    side = size * supersample
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = COLOURS[scene.background]
    for obj in scene.objects:
        _draw(canvas, obj, side)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA) if supersample > 1 else canvas


_OBJ = re.compile(r"an? (?:(small|large) )?(\w+) (circle|square|triangle)(?: at the (left|right|top|bottom)| in the (centre))?")


def parse(caption: str) -> dict:
    """A caption of the grammar -> {"background": c, "objects": [{"colour", "shape", "size", "place"}]}."""
    m = re.search(r"on an? (\w+) background$", caption)
    if not m:
        raise ValueError(f"not a caption of the demo grammar: {caption!r}")
    objects = [dict(size=s or None, colour=c, shape=sh, place=p or q or None)
               for s, c, sh, p, q in _OBJ.findall(caption[: m.start()])]
    return {"background": m.group(1), "objects": objects}
