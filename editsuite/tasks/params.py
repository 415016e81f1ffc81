"""Every edit's parameters, defined once: the CLI's options, the recipe schema, `Task.run`'s keywords, the
JSON description (`editsuite tasks --json`) and the checks all come from these definitions.

A plain frozen dataclass per parameter, not pydantic: the rules are few and ours (a size that must be a
multiple of the model's VAE factor is known only once the model is loaded), the messages must stay the
one-liners users see, and the definitions must drive typer (which reads `Annotated` signatures) and TOML
checks alike; a dataclass with a `check` callable does all three without another dependency.

Rules run in two phases from the same definition: `validate(..., factor=None)` before a model loads (types,
ranges, choices), and again with the model's VAE factor (sizes) when the task runs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
from typing import Any, Callable

import numpy as np

from editsuite.errors import UserError
from editsuite.imaging.output import MAX_SIDE

MAX_GUIDANCE = 100.0  # far above any useful scale (AUTOMATIC1111's slider stops at 30); refuses inf and 1e308
MAX_SEED = 2**32 - 1  # the seed range other SD tools use for random seeds, so seeds can be shared
SEED_LIMIT = 2**63 - 1  # the largest seed accepted (torch's generators take 64-bit seeds)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of an edit.

    `kind` is int, float, str or bool; `optional` allows None (the default then means "decided later":
    the model's size, the model's scheduler, a random seed). `low`/`high` bound numbers (inclusive);
    `choices` lists allowed strings (a callable gives them late, e.g. the scheduler names). `check` is a
    further rule, `check(value, factor)` returning the value or raising UserError; `factor` is the
    model's VAE factor, None before the model is known (rules that need it then wait). `flags` are the CLI
    spellings (default `--name-with-dashes`); `cli=False` keeps a parameter out of the CLI (the Python API
    and recipes only)."""

    name: str
    kind: type
    default: Any
    help: str
    optional: bool = False
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | Callable[[], list[str]] | None = None
    check: Callable[[Any, int | None], Any] | None = None
    flags: tuple[str, ...] = ()
    cli: bool = True
    cli_required: bool = False  # the CLI insists on it (the prompt), though Python has a default
    label: str = ""  # how messages name it ("guidance scale"); default: the name with spaces

    @property
    def spoken(self) -> str:
        return self.label or self.name.replace("_", " ")

    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    def allowed(self) -> list[str] | None:
        return list(self.choices()) if callable(self.choices) else (list(self.choices) if self.choices else None)

    def coerce(self, value: Any) -> Any:
        """The value if its type fits (ints are numbers too), else a UserError naming the type wanted."""
        if value is None and self.optional:
            return None
        if value is None and self.kind is str:  # no prompt is the empty prompt
            return ""
        if not self.accepts(value):
            raise UserError(f"{self.spoken} must be {TYPE_NAMES[self.kind]} (got {value!r})")
        return {float: float, int: int, bool: bool}.get(self.kind, lambda x: x)(value)  # numpy's become Python's

    def accepts(self, value: Any) -> bool:
        """Whether `value` has this parameter's type (an int is a number too; a bool is not)."""
        if value is None:
            return self.optional
        if isinstance(value, (bool, np.bool_)):
            return self.kind is bool
        return {bool: False, int: isinstance(value, numbers.Integral), float: isinstance(value, numbers.Real),
                str: isinstance(value, str)}[self.kind]

    def validate(self, value: Any, factor: int | None = None) -> Any:
        given, value = value, self.coerce(value)
        if value is None:
            return None
        if self.low is not None or self.high is not None:
            lo = -math.inf if self.low is None else self.low
            hi = math.inf if self.high is None else self.high
            if not lo <= value <= hi:  # refuses NaN too: every comparison with it is false
                raise UserError(_range_message(self, given))
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise UserError(f"unknown {self.spoken} {value!r}; use one of: {', '.join(allowed)}")
        return self.check(value, factor) if self.check else value

    def describe(self) -> dict[str, Any]:
        """The machine-readable description (`editsuite tasks --json`)."""
        return {"name": self.name, "type": self.kind.__name__, "default": self.default, "optional": self.optional,
                "min": self.low, "max": self.high, "choices": self.allowed(), "help": self.help,
                "cli": list(self.cli_flags()) if self.cli else None}


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _range_message(p: Param, value) -> str:
    if p.low is None:
        return f"{p.spoken} must be at most {p.high:g} (got {value})"
    if p.high is None:
        return f"{p.spoken} must be {p.low:g} or more (got {value})" if p.kind is float else \
            f"{p.spoken} must be at least {p.low:g} (got {value})"
    return f"{p.spoken} must be between {p.low:g} and {p.high:g} (got {value})"


# -- rules that are more than a range ----------------------------------------------------------------------

def text_rule(name: str):
    def check(value: str, factor=None) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes the shell could not decode arrive as lone surrogates
            raise UserError(f"the {name} holds bytes that are not UTF-8 text; write it in UTF-8") from None
        return value
    return check


def check_seed(value: int) -> int:
    if not 0 <= value <= SEED_LIMIT:
        raise UserError(f"seed must be between 0 and 2^63-1 (got {value})")
    return value


def size_rule(name: str):
    """Sizes are multiples of the model's VAE factor (8 for SD, 4 for the demo model): say so, and what the
    nearest valid values are. Before the model is known, only the bounds are checked."""

    def check(value: int, factor: int | None) -> int:
        if value > MAX_SIDE:
            raise UserError(f"{name} must be at most {MAX_SIDE} pixels (got {value})")
        if value < (factor or 1):
            raise UserError(f"{name} must be at least {factor or 1} pixel{'s' if factor else ''} (got {value})")
        if factor is None:
            return value
        if value % factor:
            lo = value - value % factor
            raise UserError(f"{name} {value} is not a multiple of {factor}; use {lo} or {lo + factor}")
        return value
    return check


def _scheduler_names() -> list[str]:
    from editsuite.core.schedulers import scheduler_choices

    return scheduler_choices()


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


# -- the definitions -------------------------------------------------------------------------------------

PROMPT = Param("prompt", str, "", "What to paint.", flags=("--prompt", "-p"), check=text_rule("prompt"),
               cli_required=True)
COMMON: tuple[Param, ...] = (
    PROMPT,
    Param("negative_prompt", str, "", "What to steer away from.", flags=("--negative-prompt", "-n"),
          check=text_rule("negative prompt")),
    Param("steps", int, DEFAULT_STEPS, "Denoising steps.", low=1),
    Param("guidance_scale", float, DEFAULT_GUIDANCE, "Classifier-free guidance scale.", low=0, high=MAX_GUIDANCE,
          flags=("--guidance", "-g")),
    Param("seed", int, None, "Random seed (default: a random one, recorded). Image i of a run takes seed + i.",
          optional=True, check=lambda v, f: check_seed(v), flags=("--seed", "-s")),
    Param("scheduler", str, None, "Scheduler: dpm++2m, dpm++2m-karras, euler, euler-a, ddim, pndm, lms, heun, "
          "unipc, ddpm, or a diffusers class name. Default: the model's own.", optional=True,
          choices=_scheduler_names),
    Param("num_images", int, 1, "Images per input.", low=1, flags=("--num-images", "-N"), label="num_images"),
    Param("eta", float, 0.0, "DDIM eta: 0 is deterministic, 1 draws fresh noise at each step.", low=0, high=1),
)


def size_params(default: str) -> tuple[Param, Param]:
    """width and height: multiples of the model's VAE factor (8 for SD, 4 for the demo model)."""
    note = f"a multiple of the model's VAE factor, 8 for SD; {default}"
    return (Param("width", int, None, f"Width in pixels ({note}).", optional=True, check=size_rule("width")),
            Param("height", int, None, f"Height in pixels ({note}).", optional=True, check=size_rule("height")))


def strength(default: float) -> Param:
    return Param("strength", float, default, "How much to change: 0 keeps the input, 1 repaints fully.", low=0,
                 high=1)


def pair_rule(name: str, sep: str, what: str):
    """"A{sep}B" with two whole numbers 0..MAX_SIDE: SDXL's sizes (WIDTHxHEIGHT) and crop corners (TOP,LEFT)."""

    def check(value: str, factor=None) -> str:
        parts = value.lower().replace(" ", "").split(sep)
        if len(parts) != 2 or not all(p.isdigit() and int(p) <= MAX_SIDE for p in parts):
            raise UserError(f"{name} must be {what}, two whole numbers up to {MAX_SIDE} (got {value!r})")
        return f"{int(parts[0])}{sep}{int(parts[1])}"
    return check


def parse_pair(value: str | None) -> tuple[int, int] | None:
    """A checked pair_rule value -> its two numbers in the written order."""
    if value is None:
        return None
    a, b = value.replace("x", ",").split(",")
    return int(a), int(b)


def _size_conditioning(name: str, what: str) -> Param:
    return Param(name, str, None, f"SDXL only: {what}, WIDTHxHEIGHT (default: the picture's size).", optional=True,
                 check=pair_rule(name.replace("_", " "), "x", "WIDTHxHEIGHT"))


def _crop_conditioning(name: str, what: str) -> Param:
    return Param(name, str, None, f"SDXL only: {what}, TOP,LEFT in pixels (default: 0,0).", optional=True,
                 check=pair_rule(name.replace("_", " "), ",", "TOP,LEFT"))


# SDXL's micro-conditioning (diffusers' original_size, crops_coords_top_left, target_size and their negative_*;
# the refiner's aesthetic_score and negative_aesthetic_score)
AESTHETIC_DEFAULTS = (6.0, 2.5)
SDXL_CONDITIONING: tuple[Param, ...] = (
    _size_conditioning("original_size", "the size the picture is said to come from"),
    _crop_conditioning("crop_top_left", "the top-left corner of the crop it is said to be"),
    _size_conditioning("target_size", "the size aimed at"),
    _size_conditioning("negative_original_size", "original size for the unconditional half"),
    _crop_conditioning("negative_crop_top_left", "crop corner for the unconditional half"),
    _size_conditioning("negative_target_size", "target size for the unconditional half"),
    Param("aesthetic_score", float, None, f"SDXL refiner only: the aesthetic score asked for (default "
          f"{AESTHETIC_DEFAULTS[0]:g}).", optional=True, low=0, high=10),
    Param("negative_aesthetic_score", float, None, f"SDXL refiner only: the unconditional half's (default "
          f"{AESTHETIC_DEFAULTS[1]:g}).", optional=True, low=0, high=10),
)


def by_name(params: tuple[Param, ...]) -> dict[str, Param]:
    return {p.name: p for p in params}


def validate(params: tuple[Param, ...], values: dict[str, Any], *, factor: int | None = None,
             where: str = "") -> dict[str, Any]:
    """Every parameter's value (the default where `values` has none), checked; unknown names are refused.
    `where` prefixes messages (a recipe names its key). Seeds stay None here: the task draws one."""
    table = by_name(params)
    unknown = sorted(set(values) - set(table))
    if unknown:
        raise UserError(f"{where}unknown parameter {unknown[0]!r}; this edit takes {', '.join(sorted(table))}")
    out = {}
    for name, p in table.items():
        value = values.get(name, p.default)
        try:
            out[name] = p.validate(value, factor)
        except UserError as e:
            raise UserError(f"{where}{e}") from None
    return out


def describe(params: tuple[Param, ...]) -> list[dict[str, Any]]:
    return [p.describe() for p in params]
