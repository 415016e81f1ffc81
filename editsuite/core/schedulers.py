"""Schedulers: diffusers' own classes, picked by class name or by the short names users know."""

from __future__ import annotations

from typing import Any

import diffusers
from diffusers.schedulers import KarrasDiffusionSchedulers

from editsuite.errors import UserError

# Short name -> (diffusers class, config overrides). The AUTOMATIC1111 names map to these classes.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}

# Names AUTOMATIC1111 writes in its "Sampler:" field, so PNG metadata reads the same in other tools.
A1111_NAMES = {
    "dpm++2m": "DPM++ 2M",
    "dpm++2m-karras": "DPM++ 2M Karras",
    "euler": "Euler",
    "euler-a": "Euler a",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "heun": "Heun",
    "unipc": "UniPC",
    "ddpm": "DDPM",
}

CLASS_NAMES = sorted(e.name for e in KarrasDiffusionSchedulers)


def scheduler_choices() -> list[str]:
    return list(ALIASES) + CLASS_NAMES


def make_scheduler(name: str | None, model_config: dict):
    """A fresh scheduler instance: `name` (alias or class name) configured from the model's own config.

    `None` means the model's own scheduler class with its config unchanged.
    """
    config = dict(model_config)
    if name is None:
        cls_name, overrides = config.get("_class_name", "PNDMScheduler"), {}
    elif name in ALIASES:
        cls_name, overrides = ALIASES[name]
    elif name in CLASS_NAMES:
        cls_name, overrides = name, {}
    else:
        raise UserError(f"unknown scheduler {name!r}; use one of: {', '.join(scheduler_choices())}")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise UserError(f"scheduler class {cls_name} is not in this diffusers version; use one of: {', '.join(ALIASES)}")
    return cls.from_config(config, **overrides)


def display_name(name: str | None, model_config: dict) -> str:
    """The sampler's name as other SD tools show it in PNG metadata."""
    if name in A1111_NAMES:
        return A1111_NAMES[name]
    cls_name = name or model_config.get("_class_name", "")
    for alias, (cls, overrides) in ALIASES.items():
        if cls == cls_name and not overrides.get("use_karras_sigmas"):
            return A1111_NAMES[alias]
    return cls_name
