"""Schedulers: diffusers' own classes, picked by class name or by the short names users know."""

from __future__ import annotations

import enum
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

# The short names as an Enum (the CLI's and the JSON description's choices); any diffusers class name in
# CLASS_NAMES is accepted too.
SchedulerAlias = enum.Enum("SchedulerAlias", {name.replace("+", "P").replace("-", "_").upper(): name
                                              for name in ALIASES}, type=str)
CLASS_NAMES = sorted(e.name for e in KarrasDiffusionSchedulers)


def scheduler_choices() -> list[str]:
    return [a.value for a in SchedulerAlias] + CLASS_NAMES


# The corrections diffusers' Stable Diffusion pipelines make to an old scheduler config when they are built
# (StableDiffusionPipeline, Img2Img and Inpaint: steps_offset and clip_sample; Inpaint also skip_prk_steps;
# the x4 upscale pipeline makes none). A model run here must get the scheduler diffusers' pipeline runs.
FIXES = {"steps_offset": (lambda v: v != 1, 1), "clip_sample": (lambda v: v is True, False),
         "skip_prk_steps": (lambda v: v is False, True)}
PIPELINE_FIXES = ("steps_offset", "clip_sample")
INPAINT_FIXES = PIPELINE_FIXES + ("skip_prk_steps",)


def pipeline_config(model_config: dict, fixes: tuple[str, ...] = PIPELINE_FIXES) -> dict:
    """`model_config` as the diffusers pipeline that applies `fixes` corrects it (keys it lacks stay absent,
    as diffusers only corrects a key the config has)."""
    config = dict(model_config)
    for key in fixes:
        wrong, right = FIXES[key]
        if key in config and wrong(config[key]):
            config[key] = right
    return config


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
    else:  # the tasks' parameter check (tasks/params.py) refuses unknown names before this
        raise ValueError(f"unknown scheduler {name!r}")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise UserError(f"scheduler class {cls_name} is not in this diffusers version; use one of: {', '.join(ALIASES)}")
    return cls.from_config(config, **overrides)


# AUTOMATIC1111 1.10's sampler labels for the diffusers schedulers that run the same method. A scheduler
# with no label here (DDPM, DEIS, DPM-Solver single-step, PNDM with its Runge-Kutta warm-up) gets none:
# A1111 replays an unknown label as DPM++ 2M without a word, so only the JSON chunk names it.
A1111_SAMPLERS = {
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a", "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun", "KDPM2DiscreteScheduler": "DPM2", "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE", "DDIMScheduler": "DDIM", "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
A1111_MULTISTEP = {("dpmsolver++", 2): "DPM++ 2M", ("sde-dpmsolver++", 2): "DPM++ 2M SDE"}
A1111_TIMESTEP_SAMPLERS = {"DDIM", "PLMS", "UniPC"}  # A1111 runs these on timesteps: they take no schedule type


def a1111_sampler(scheduler) -> tuple[str | None, str | None]:
    """(Sampler, Schedule type) as AUTOMATIC1111 >= 1.9 writes them for the method `scheduler` runs, or None
    where A1111 has no such sampler (or schedule).

    The schedule type is always written for a k-diffusion sampler: a bare "DPM++ 2M" is replayed by A1111
    with its default, Karras. diffusers' own spacing is A1111's "Uniform" for Euler, LMS and Heun, and
    closest to "SGM Uniform" for the DPM-Solver family (its timesteps are linspace(0, 999, n + 1)).
    """
    cls, cfg = type(scheduler).__name__, scheduler.config
    if cls == "DPMSolverMultistepScheduler":
        name = A1111_MULTISTEP.get((cfg.algorithm_type, cfg.solver_order))
    elif cls == "PNDMScheduler":
        name = "PLMS" if cfg.skip_prk_steps else None
    else:
        name = A1111_SAMPLERS.get(cls)
    if name is None or name in A1111_TIMESTEP_SAMPLERS:
        return name, None
    if getattr(cfg, "use_karras_sigmas", False):
        return name, "Karras"
    if getattr(cfg, "use_exponential_sigmas", False):
        return name, "Exponential"
    return name, "SGM Uniform" if cls.startswith("DPMSolver") else "Uniform"
