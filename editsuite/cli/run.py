"""What every command does around its task: check everything, load the model once, run, save atomically.

Order matters for "nothing written on bad input": settings are checked, every input is opened and every
output name is planned (and checked against existing files) before the model is loaded, and files are
written only after a task succeeded, each atomically.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import typer

from editsuite.core.schedulers import scheduler_choices
from editsuite.errors import UserError
from editsuite.imaging.io import open_image, open_mask
from editsuite.imaging.metadata import png_info, png_settings
from editsuite.imaging.output import (DEFAULT_MAX_OUTPUT_PIXELS, check_output_size, check_writable, output_paths,
                                      save_atomic)
from editsuite.tasks import TASKS
from editsuite.tasks.base import Common, check_size, check_strength


@dataclasses.dataclass
class Job:
    """One command line: the task name, every CLI value, the task's own arguments and an optional mask."""

    task: str
    cli: dict[str, Any]
    task_args: dict[str, Any]
    mask: Path | None = None

    def opt(self, name: str, default=None):
        return self.cli.get(name, default)


def execute(job: Job) -> None:
    quiet, as_json = job.opt("quiet"), job.opt("json_out")
    # 1. Check settings before anything slow
    common = Common(prompt=job.opt("prompt") or "", negative_prompt=job.opt("negative_prompt") or "",
                    steps=job.opt("steps"), guidance_scale=job.opt("guidance") or 0.0, seed=job.opt("seed"),
                    scheduler=job.opt("scheduler"), num_images=job.opt("num_images")).validated()
    if common.scheduler is not None and common.scheduler not in scheduler_choices():
        raise UserError(f"unknown scheduler {common.scheduler!r}; use one of: {', '.join(scheduler_choices())}")
    if "strength" in job.task_args:
        check_strength(job.task_args["strength"])
    for key in ("width", "height"):
        check_size(job.task_args.get(key), key)
    if job.opt("cache_interval", 1) < 1:
        raise UserError(f"--cache-interval must be at least 1 (got {job.opt('cache_interval')}); 1 turns it off")
    # 2. Open every input (and mask) now, so a bad file stops the run before anything is written
    max_pixels = job.opt("max_pixels")
    paths: list[Path] = list(job.opt("inputs") or [])
    images = [open_image(p, max_pixels=max_pixels) for p in paths]
    mask = open_mask(job.mask, max_pixels=max_pixels) if job.mask is not None else None
    if mask is not None:
        from editsuite.tasks.inpaint import checked_mask

        for im in images:
            checked_mask(im, mask, resize_mask=job.task_args["resize_mask"], invert_mask=job.task_args["invert_mask"])
    max_output = job.opt("max_output_pixels", DEFAULT_MAX_OUTPUT_PIXELS)
    task_cls = TASKS[job.task]
    sizes = [task_cls.output_size(job.task_args, im.size if im else None) for im in images or [None]]
    check_output_size([s for s in sizes if s is not None], common.num_images, max_output)
    # 3. Plan every output name; an existing file stops the run unless --overwrite
    n = common.num_images
    outs = output_paths(job.opt("output"), task=job.task, seeds=[common.seed + j for j in range(n)], inputs=paths or None,
                        n_per_input=n, overwrite=job.opt("overwrite"))
    for folder in {p.parent for p in outs}:
        check_writable(folder)
    # 4. Load the model once, build the task
    bundle = _load(job, quiet)
    task = task_cls(bundle, max_output_pixels=max_output)  # checks what only the model tells (its own size)
    shown = {bundle.notice}
    # 5. Run each input, then save its outputs atomically
    run_args = dict(prompt=common.prompt, negative_prompt=common.negative_prompt, steps=common.steps,
                    seed=common.seed, scheduler=common.scheduler, num_images=n, **job.task_args)
    if job.opt("guidance") is not None:
        run_args["guidance_scale"] = common.guidance_scale
    written = []
    for idx, item in enumerate(images or [None]):
        args = dict(run_args)
        if mask is not None:
            args["mask"] = mask
        label = paths[idx].name if paths else job.task
        with _Progress(label, quiet) as progress:
            result = task.run(item, **args, callback=progress.step) if item is not None else \
                task.run(**args, callback=progress.step)
        late = getattr(bundle.backend, "notice", None)  # e.g. an fp16 VAE that fell back to float32
        if late not in shown and not quiet:
            typer.echo(late, err=True)
            shown.add(late)
        for j, image in enumerate(result.images):
            settings = result.image_settings(j)
            if paths:
                settings["input"] = str(paths[idx])
            out = save_atomic(image, outs[idx * n + j], pnginfo=png_info(png_settings(settings)),
                              overwrite=job.opt("overwrite"))
            written.append({"path": str(out), "settings": settings})
            if not quiet and not as_json:
                typer.echo(f"wrote {out}", err=True)
    if as_json:
        typer.echo(json.dumps(written, indent=2, default=str))


def _load(job: Job, quiet: bool):
    from editsuite.bundle.loader import load_bundle

    model = job.opt("model")
    if model is None:
        from editsuite.demo import NOTICE, TASK_KIND, demo_model

        model = demo_model(TASK_KIND[job.task])
        if model is None:
            raise UserError("no --model given and the built-in demo model is not installed; pass --model with a "
                            "diffusers folder, a .safetensors checkpoint or a hub id")
        if not quiet:
            typer.echo(NOTICE.format(kind=TASK_KIND[job.task].value), err=True)
    from editsuite.bundle.coreml_layout import is_coreml_folder

    if job.opt("compute_units", "all") != "all" and not is_coreml_folder(Path(model).expanduser()):
        raise UserError(f"--compute-units applies to Core ML bundles only (it picks where Core ML runs them); {model} "
                        "runs in PyTorch: leave it out, or use --device")
    bundle = load_bundle(model, backend=job.opt("backend"), device=job.opt("device"), dtype=job.opt("dtype"),
                         allow_pickle=job.opt("allow_pickle"), compute_units=job.opt("compute_units", "all"),
                         config=job.opt("config"), prediction_type=job.opt("prediction_type"))
    if bundle.notice and not quiet:
        typer.echo(bundle.notice, err=True)
    bundle.cache_interval = job.opt("cache_interval", 1)
    return bundle


class _Progress:
    """A rich progress bar over the denoising steps of one run (nothing with --quiet or without a terminal)."""

    def __init__(self, label: str, quiet: bool):
        self.label, self.enabled = label, not quiet and sys.stderr.isatty()
        self.bar = self.current = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=True)
            self.bar.start()
        return self

    def step(self, s) -> None:
        if self.bar is None:
            return
        if self.current is None:
            self.current = self.bar.add_task(self.label, total=s.total)
        elif s.index == 0:  # the next run of a multi-run task (tiles): start the bar over
            self.bar.reset(self.current, total=s.total)
        self.bar.update(self.current, completed=s.index + 1)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
