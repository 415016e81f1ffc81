"""What every task shares: settings, validation, the result type, and the run skeleton."""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, ClassVar

import PIL.Image

from editsuite.bundle.manifest import ModelKind
from editsuite.core import loop
from editsuite.core.prompts import TimeIds, encode_prompt
from editsuite.core.schedulers import PIPELINE_FIXES, a1111_sampler, make_scheduler, pipeline_config
from editsuite.errors import UserError
from editsuite.imaging.output import DEFAULT_MAX_OUTPUT_PIXELS, check_output_size
from editsuite.tasks import params as P
from editsuite.tasks.params import Param, random_seed


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
    """The settings every task takes (see params.COMMON), checked, with the seed drawn when none was given."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None
    num_images: int
    eta: float

    @classmethod
    def of(cls, values) -> "Common":
        """From a run's checked values (a namespace or a dict)."""
        v = values if isinstance(values, dict) else vars(values)
        fields = {f.name: v[f.name] for f in dataclasses.fields(cls)}
        if fields["seed"] is None:
            fields["seed"] = random_seed()
        return cls(**fields)


def round_to(x: int, multiple: int) -> int:
    """Nearest multiple (at least one multiple)."""
    return max(multiple, int(round(x / multiple)) * multiple)


class Task:
    """A task prepares inputs for the shared loop. A subclass defines `name`, `kinds`, `inputs` (the pictures
    it takes, positionally), `params` (its parameters: params.Param definitions, from which `run`'s keywords,
    the CLI command, the recipe schema and the JSON description all come) and `_run`, which gets the
    inputs and the checked values as a namespace."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: the CLI command's help
    kinds: ClassVar[tuple[ModelKind, ...]] = (ModelKind.BASE,)
    inputs: ClassVar[tuple[str, ...]] = ()
    takes_refiner: ClassVar[bool] = False  # the CLI's --refiner (SDXL's ensemble of experts)
    params: ClassVar[tuple[Param, ...]] = P.COMMON
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
        if isinstance(max_output_pixels, bool) or not isinstance(max_output_pixels, int) or max_output_pixels < 1:
            raise UserError(f"max_output_pixels must be a positive whole number of pixels (got {max_output_pixels!r})")
        self.bundle = bundle
        self.max_output_pixels = max_output_pixels

    def __init_subclass__(cls, **kw):
        """Each task's `run` takes its inputs (and the prompt) positionally and its parameters by keyword; its
        signature, for help() and editors, is made from the definitions."""
        super().__init_subclass__(**kw)

        def run(self, *args, callback: loop.StepCallback | None = None, **kwargs) -> TaskResult:
            return self._dispatch(args, kwargs, callback)
        run.__signature__ = _signature(cls)
        run.__doc__ = f"{cls.summary}\n\n" + "\n".join(f"{p.name}: {p.help}" for p in cls.params)
        run.__qualname__ = f"{cls.__name__}.run"
        cls.run = run

    @classmethod
    def validate(cls, values: dict[str, Any], factor: int | None = None) -> dict[str, Any]:
        """Every parameter checked (defaults filled in): the one place the rules run. `factor` is the model's VAE
        factor; None before the model is known (the CLI and recipes check then, the task again when it runs)."""
        checked = P.validate(cls.params, values, factor=factor)
        seed, n = checked.get("seed"), checked.get("num_images", 1)
        if seed is not None and seed + n - 1 > P.SEED_LIMIT:  # image i takes seed + i: each must be a valid seed
            raise UserError(f"seed {seed} with {n} images would pass the largest seed, 2^63-1; use a smaller seed")
        cls.check_together(checked)
        return checked

    @classmethod
    def check_inputs(cls, values: dict[str, Any], images: list, mask, max_output_pixels: int) -> None:
        """What can be checked once the pictures are open, before a model loads: the mask fits each picture,
        and the run's pictures stay within `max_output_pixels` all together (the CLI and the studio; the task
        checks again when it runs)."""
        if mask is not None:
            from editsuite.tasks.inpaint import checked_mask

            for im in images:
                checked_mask(im, mask, resize_mask=values["resize_mask"], invert_mask=values["invert_mask"])
        sizes = [cls.output_size(values, im.size if im else None) for im in images or [None]]
        check_output_size([s for s in sizes if s is not None], values["num_images"], max_output_pixels)

    @classmethod
    def check_together(cls, values: dict[str, Any]) -> None:
        """Rules between parameters (none by default)."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The machine-readable description of this edit (`editsuite tasks --json`)."""
        return {"name": cls.name, "summary": cls.summary, "inputs": list(cls.inputs),
                "model_kinds": [k.value for k in cls.kinds], "params": P.describe(cls.params)}

    def _dispatch(self, args: tuple, kwargs: dict, callback) -> TaskResult:
        names = (*self.inputs, "prompt")
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.run takes {len(names)} positional arguments ({', '.join(names)}), "
                            f"got {len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.run got two values for {name!r}")
            kwargs[name] = value
        missing = [n for n in self.inputs if n not in kwargs]
        if missing:
            raise TypeError(f"{type(self).__name__}.run needs {', '.join(missing)}")
        inputs = {n: kwargs.pop(n) for n in self.inputs}
        values = self.validate(kwargs, self.bundle.manifest.vae_scale_factor)
        return self._run(**inputs, v=types.SimpleNamespace(**values), callback=callback)

    def _run(self, *, v, callback) -> TaskResult:
        raise NotImplementedError

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

    def start(self, values, fixes: tuple[str, ...] | None = None, time_ids: TimeIds | None = None):
        """The shared settings (the seed drawn if none), the guidance, a fresh scheduler and the generators
        (image i: seed + i). An SDXL model also needs its `time_ids` (see `size_conditioning`)."""
        c = Common.of(values)
        scheduler = self.new_scheduler(c.scheduler, fixes)
        guidance = encode_prompt(self.bundle, c.prompt, c.negative_prompt, c.num_images, c.guidance_scale, time_ids)
        return c, guidance, scheduler, loop.generators_for(c.seed, c.num_images)

    def size_conditioning(self, v, width: int, height: int, pipeline: str, bundle=None) -> TimeIds | None:
        """SDXL's time ids from the run's params.SDXL_CONDITIONING values, as diffusers' SDXL `pipeline`
        builds them for `bundle` (the task's own by default); None for SD 1.x/2.x models, which refuse those
        values. The aesthetic scores are the refiner's: for other models they are refused."""
        b = bundle or self.bundle
        m = b.manifest
        given = [p for p in P.SDXL_CONDITIONING if getattr(v, p.name, None) is not None]
        if not m.xl:
            if given:
                raise UserError(f"{given[0].spoken} is SDXL's conditioning, and {m.name or 'this model'} is an SD "
                                "1.x/2.x model; leave it out")
            return None
        scores = (getattr(v, "aesthetic_score", None), getattr(v, "negative_aesthetic_score", None))
        if bundle is None and not m.refiner and getattr(self, "refiner", None) is None and scores != (None, None):
            raise UserError(f"the aesthetic scores condition SDXL's refiner, and {m.name or 'this model'} is not one; "
                            "leave them out")
        def pair(name):  # as written: WIDTHxHEIGHT or TOP,LEFT
            return P.parse_pair(getattr(v, name, None))

        def size(name):  # diffusers takes sizes as (height, width)
            wh = pair(name)
            return wh and (wh[1], wh[0])
        crop = pair
        aesthetic = None
        if m.refiner:
            aesthetic = tuple(d if s is None else s for s, d in zip(scores, P.AESTHETIC_DEFAULTS))
        return TimeIds.build(width, height, pipeline=pipeline, original=size("original_size"),
                             crop=crop("crop_top_left"), target=size("target_size"),
                             negative_original=size("negative_original_size"),
                             negative_crop=crop("negative_crop_top_left"), negative_target=size("negative_target_size"),
                             aesthetic=aesthetic)

    @staticmethod
    def size_conditioning_settings(v) -> dict[str, Any]:
        """The SDXL conditioning values a run was given, for its metadata."""
        return {p.name: getattr(v, p.name) for p in P.SDXL_CONDITIONING if getattr(v, p.name, None) is not None}

    def new_scheduler(self, name: str | None, fixes: tuple[str, ...] | None = None, bundle=None):
        """A fresh scheduler: `name` built from the config of `bundle` (the task's own by default) as the
        matching diffusers pipeline corrects it (`fixes`, the task's own by default; SDXL's pipelines correct
        nothing)."""
        b = bundle or self.bundle
        if b.manifest.xl:
            fixes = ()
        config = pipeline_config(b.scheduler_config, self.scheduler_fixes if fixes is None else fixes)
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


def _signature(cls) -> inspect.Signature:
    kinds = inspect.Parameter
    params = [kinds("self", kinds.POSITIONAL_ONLY)]
    params += [kinds(n, kinds.POSITIONAL_OR_KEYWORD) for n in cls.inputs]
    for p in sorted(cls.params, key=lambda p: p.name != "prompt"):  # the prompt may come positionally
        annotation = p.kind if not p.optional else (p.kind | None)
        kind = kinds.POSITIONAL_OR_KEYWORD if p.name == "prompt" else kinds.KEYWORD_ONLY
        params.append(kinds(p.name, kind, default=p.default, annotation=annotation))
    params.append(kinds("callback", kinds.KEYWORD_ONLY, default=None))
    return inspect.Signature(params, return_annotation=TaskResult)
