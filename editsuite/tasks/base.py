"""What every task shares: settings, validation, the result type, and the run skeleton."""

from __future__ import annotations

import dataclasses
import random
from typing import Any, ClassVar

import PIL.Image

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.core.prompts import encode_prompt
from editsuite.core.schedulers import PIPELINE_FIXES, a1111_sampler, make_scheduler, pipeline_config
from editsuite.errors import UserError
from editsuite.imaging.output import DEFAULT_MAX_OUTPUT_PIXELS, MAX_SIDE, check_output_size

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
MAX_GUIDANCE = 100.0  # far above any useful scale (AUTOMATIC1111's slider stops at 30); refuses inf and 1e308
MAX_SEED = 2**32 - 1  # the seed range other SD tools use, so seeds can be shared


@dataclasses.dataclass
class TaskResult:
    """`images`: the outputs (PIL, RGB); `metadata`: every setting that made them, and the model's identity."""

    images: list[PIL.Image.Image]
    metadata: dict[str, Any]

    def image_settings(self, index: int) -> dict[str, Any]:
        """The settings of image `index` alone: its own seed (`seed + index`, which reproduces it with one
        image) and its place in the batch."""
        return {**self.metadata, "seed": self.metadata["seed"] + index, "batch_index": index}


@dataclasses.dataclass(frozen=True)
class Common:
    """Settings every task takes, validated once."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None
    scheduler: str | None = None
    num_images: int = 1
    eta: float = 0.0

    def validated(self) -> "Common":
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UserError(f"steps must be at least 1 (got {self.steps})")
        if self.num_images < 1:
            raise UserError(f"num_images must be at least 1 (got {self.num_images})")
        if not 0 <= self.guidance_scale <= MAX_GUIDANCE:  # refuses NaN too: every comparison with it is false
            raise UserError(f"guidance scale must be between 0 and {MAX_GUIDANCE:g} (got {self.guidance_scale})")
        for name, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            try:
                (text or "").encode("utf-8")
            except UnicodeEncodeError:  # bytes the shell could not decode arrive as lone surrogates
                raise UserError(f"the {name} holds bytes that are not UTF-8 text; write it in UTF-8") from None
        if not 0 <= self.eta <= 1:
            raise UserError(f"eta must be between 0 and 1 (got {self.eta})")
        seed = self.seed
        if seed is None:
            seed = random.randint(0, MAX_SEED)
        elif not 0 <= int(seed) < 2**63:
            raise UserError(f"seed must be between 0 and 2^63-1 (got {seed})")
        return dataclasses.replace(self, seed=int(seed), prompt=self.prompt or "", negative_prompt=self.negative_prompt or "")


def check_strength(strength: float, name: str = "strength") -> float:
    if not 0.0 <= float(strength) <= 1.0:
        raise UserError(f"{name} must be between 0 and 1 (got {strength})")
    return float(strength)


def check_size(value: int | None, name: str, multiple: int = 8) -> int | None:
    """Sizes must be multiples of the VAE factor: say so, and what the nearest valid values are."""
    if value is None:
        return None
    if value < multiple:
        raise UserError(f"{name} must be at least {multiple} pixels (got {value})")
    if value > MAX_SIDE:  # the CLI, recipes and the Python API all come through here
        raise UserError(f"{name} must be at most {MAX_SIDE} pixels (got {value})")
    if value % multiple:
        lo = value - value % multiple
        raise UserError(f"{name} {value} is not a multiple of {multiple}; use {lo} or {lo + multiple}")
    return value


def round_to(x: int, multiple: int) -> int:
    """Nearest multiple (at least one multiple)."""
    return max(multiple, int(round(x / multiple)) * multiple)


class Task:
    """A task prepares inputs for the shared loop; subclasses define `name`, `kinds` and `run`."""

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[ModelKind, ...]] = (ModelKind.BASE,)
    # the scheduler-config corrections of the diffusers pipeline this task matches (see schedulers.FIXES)
    scheduler_fixes: ClassVar[tuple[str, ...]] = PIPELINE_FIXES

    def __init__(self, bundle, *, max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS):
        """`max_output_pixels` bounds a run's pictures, all together (CLI: --max-output-pixels): a run over
        it is refused before any work, instead of ending in an out-of-memory error."""
        if bundle.kind not in self.kinds:
            allowed = " or ".join(k.value for k in self.kinds)
            raise UserError(
                f"{self.name} needs a {allowed} model, but {bundle.manifest.name or 'this model'} is a "
                f"{bundle.kind.value} model; pass a suitable one with --model"
            )
        self.bundle = bundle
        self.max_output_pixels = max_output_pixels

    @classmethod
    def output_size(cls, args: dict, image_size: tuple[int, int] | None) -> tuple[int, int] | None:
        """The size of each picture a run with `args` (the run's keyword arguments) makes from an input of
        `image_size`, as far as it is known before the model loads (None: not known yet). The CLI and
        batches check it against the output bound before loading anything."""
        w, h = image_size
        return args.get("width") or w, args.get("height") or h

    def check_output(self, width: int, height: int, num_images: int) -> None:
        check_output_size([(width, height)], num_images, self.max_output_pixels)

    # -- pieces every run uses -------------------------------------------------------------------------

    def start(self, common: Common, fixes: tuple[str, ...] | None = None):
        """Validated settings, the guidance, a fresh scheduler and the generators (image i: seed + i)."""
        c = common.validated()
        scheduler = self.new_scheduler(c.scheduler, fixes)
        guidance = encode_prompt(self.bundle, c.prompt, c.negative_prompt, c.num_images, c.guidance_scale)
        return c, guidance, scheduler, loop.generators_for(c.seed, c.num_images)

    def new_scheduler(self, name: str | None, fixes: tuple[str, ...] | None = None):
        """A fresh scheduler: `name` built from the model's config as the matching diffusers pipeline
        corrects it (`fixes`, the task's own by default)."""
        config = pipeline_config(self.bundle.scheduler_config, self.scheduler_fixes if fixes is None else fixes)
        return make_scheduler(name, config)

    def metadata(self, c: Common, width: int, height: int, **extra) -> dict[str, Any]:
        from editsuite import __version__

        sampler, schedule_type = a1111_sampler(self.new_scheduler(c.scheduler))
        return {
            "task": self.name,
            "prompt": c.prompt,
            "negative_prompt": c.negative_prompt,
            "steps": c.steps,
            "guidance_scale": c.guidance_scale,
            "seed": c.seed,
            "scheduler": c.scheduler or self.bundle.scheduler_config.get("_class_name"),
            "sampler": sampler,  # AUTOMATIC1111's names, or None where it has none
            "schedule_type": schedule_type,
            "num_images": c.num_images,
            "eta": c.eta,
            "width": width,
            "height": height,
            **extra,
            "model": self.bundle.identity(),
            "backend": self.bundle.backend.name,
            "dtype": str(self.bundle.compute_dtype).replace("torch.", ""),
            **({"cache_interval": self.bundle.cache_interval} if self.bundle.cache_interval > 1 else {}),
            "editsuite": __version__,
        }

