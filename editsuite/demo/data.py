"""The demo family's data, split by content: scenes drawn from the grammar for training, and the evaluation's
prompts and cases, drawn only from content that no training stage ever draws. Shared by training (train.py)
and scoring (score.py), which need nothing else of each other.

The held-out content is fixed (its own seed): HELD_TRIPLES, (background, colour, shape) combinations, and
HELD_PAIRS, two-object pairings of (colour, shape). A scene holds held-out content when one of its objects
on its background is a held triple, or its two objects are a held pair. Training rejects every such scene
(`scenes`), so no picture a stage learns from shows any held triple or pair, whatever its caption says or
leaves out; the evaluation (`heldout_prompts`, `heldout_scenes`) uses only such scenes, so a model scores on
combinations it has never seen, not on captions it has seen in other words.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from editsuite.demo.scenes import COLOURS, SHAPES, Scene, sample_scene

HELDOUT_SEED = 20261127
N_TRIPLES = 24  # of the 168 (background, colour, shape) combinations: 14 %
N_PAIRS = 24  # of the 252 pairings of two objects of different colours: 10 %


def _held_content() -> tuple[frozenset, frozenset]:
    rng = np.random.default_rng(HELDOUT_SEED)
    triples = [(bg, c, s) for bg in COLOURS for c in COLOURS if c != bg for s in SHAPES]
    pairs = [frozenset(p) for p in itertools.combinations([(c, s) for c in COLOURS for s in SHAPES], 2)
             if p[0][0] != p[1][0]]
    held_triples = frozenset(triples[i] for i in rng.choice(len(triples), N_TRIPLES, replace=False))
    held_pairs = frozenset(pairs[i] for i in rng.choice(len(pairs), N_PAIRS, replace=False))
    return held_triples, held_pairs


HELD_TRIPLES, HELD_PAIRS = _held_content()


def held_out(scene: Scene) -> bool:
    """Whether the scene shows held-out content: a held triple, or a held pair of objects."""
    if any((scene.background, o.colour, o.shape) in HELD_TRIPLES for o in scene.objects):
        return True
    return len(scene.objects) == 2 and frozenset((o.colour, o.shape) for o in scene.objects) in HELD_PAIRS


def heldout_scenes(n: int, seed: int, **mix) -> list[Scene]:
    """n scenes of held-out content, drawn from the grammar with `seed`: the evaluation's cases."""
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < n:
        s = sample_scene(rng, **mix)
        if held_out(s):
            out.append(s)
    return out


def heldout_prompt_scenes(n: int = 200) -> list[Scene]:
    """The scenes of the txt2img evaluation prompts: distinct captions of held-out scenes, own seed."""
    rng = np.random.default_rng(HELDOUT_SEED)
    out: list[Scene] = []
    captions: set[str] = set()
    while len(out) < n:
        s = sample_scene(rng)
        if held_out(s) and s.caption() not in captions:
            captions.add(s.caption())
            out.append(s)
    return out


def heldout_prompts(n: int = 200) -> list[str]:
    """The txt2img evaluation prompts."""
    return [s.caption() for s in heldout_prompt_scenes(n)]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def scenes(n: int, rng: np.random.Generator, **mix) -> list[Scene]:
    """n training scenes: never held-out content; `mix` goes to sample_scene (e.g. two_objects=0.6)."""
    out = []
    while len(out) < n:
        s = sample_scene(rng, **mix)
        if not held_out(s):
            out.append(s)
    return out
