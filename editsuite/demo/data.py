"""The demo family's data: scenes drawn from the grammar for training, and the held-out evaluation prompts
(which training never sees). Shared by training (train.py) and scoring (score.py), which need nothing else
of each other."""

from __future__ import annotations

import numpy as np
import torch

from editsuite.demo.scenes import sample_scene

HELDOUT_SEED = 20261127


def heldout_prompts(n: int = 200) -> list[str]:
    """The evaluation prompts: drawn from the grammar with their own seed, excluded from training."""
    rng = np.random.default_rng(HELDOUT_SEED)
    out: list[str] = []
    while len(out) < n:
        c = sample_scene(rng).caption()
        if c not in out:
            out.append(c)
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def scenes(n: int, rng: np.random.Generator, banned: set[str], **mix) -> list:
    """n scenes whose captions are not in `banned`; `mix` goes to sample_scene (e.g. two_objects=0.6)."""
    out = []
    while len(out) < n:
        s = sample_scene(rng, **mix)
        if s.caption() not in banned:
            out.append(s)
    return out
