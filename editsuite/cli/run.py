"""What every command does around its task: check everything, load the model once, run, save atomically.

Order matters for "nothing written on bad input": settings are checked, every input is opened and every
output name is planned (and checked against existing files) before the model is loaded, and files are
written only after a task succeeded, each atomically.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from pathlib import Path
from typing import Any

import typer

from editsuite.errors import UserError
from editsuite.imaging.io import open_image, open_mask
from editsuite.imaging.metadata import png_info, png_settings
from editsuite.imaging.output import check_writable, output_paths, save_atomic
from editsuite.tasks.base import Task
from editsuite.tasks.params import random_seed


@dataclasses.dataclass
class Job:
    """One command line: the edit, its parameters' values, its input pictures (and mask), and the settings
    around it (model, backend, output...)."""

    task: type[Task]
    values: dict[str, Any]
    inputs: list[Path]
    mask: Path | None
    options: dict[str, Any]

    @classmethod
    def of(cls, task: type[Task], given: dict[str, Any]) -> "Job":
        names = {p.name for p in task.params}
        values = {k: v for k, v in given.items() if k in names}
        options = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in given.items()
                   if k not in names and k not in ("inputs", "mask")}
        return cls(task, values, list(given.get("inputs") or []), given.get("mask"), options)


def execute(task: type[Task], given: dict[str, Any]) -> None:
    """Run one edit command: `given` holds every value of the command line, by parameter name."""
    job = Job.of(task, given)
    opts = job.options
    quiet, as_json = opts["quiet"], opts["json_out"]
    # 1. Check the parameters (their own definitions) and the settings, before anything slow
    values = task.validate(job.values)
    if values["seed"] is None:  # drawn now, so the output names and the pictures agree
        values["seed"] = random_seed()
    if opts["cache_interval"] < 1:
        raise UserError(f"--cache-interval must be at least 1 (got {opts['cache_interval']}); 1 turns it off")
    # 2. Open every input (and mask) now, so a bad file stops the run before anything is written
    max_pixels = opts.get("max_pixels")
    images = [open_image(p, max_pixels=max_pixels) for p in job.inputs]
    mask = open_mask(job.mask, max_pixels=max_pixels) if job.mask is not None else None
    max_output = opts["max_output_pixels"]
    task.check_inputs(values, images, mask, max_output)
    # 3. Plan every output name; an existing file stops the run unless --overwrite; the folders must be writable
    n, seed = values["num_images"], values["seed"]
    outs = output_paths(opts["output"], task=task.name, seeds=[seed + j for j in range(n)],
                        inputs=job.inputs or None, n_per_input=n, overwrite=opts["overwrite"])
    for folder in {p.parent for p in outs}:
        check_writable(folder)
    # 4. Load the model once, build the task
    bundle = _load(task, opts, quiet)
    extra = {"refiner": _load_refiner(opts, bundle)} if opts.get("refiner") else {}
    runner = task(bundle, max_output_pixels=max_output, **extra)  # checks what only the model tells (its own size)
    shown = {bundle.notice}
    # 5. Run each input, then save its outputs atomically
    written = []
    for idx, item in enumerate(images or [None]):
        inputs = [item, mask] if mask is not None else ([item] if item is not None else [])
        label = job.inputs[idx].name if job.inputs else task.name
        with _Progress(label, quiet) as progress:
            result = runner.run(*inputs, **values, callback=progress.step)
        late = getattr(bundle.backend, "notice", None)  # e.g. an fp16 VAE that fell back to float32
        if late not in shown and not quiet:
            typer.echo(late, err=True)
            shown.add(late)
        for j, image in enumerate(result.images):
            settings = result.image_settings(j)
            if job.inputs:
                settings["input"] = str(job.inputs[idx])
            out = save_atomic(image, outs[idx * n + j], pnginfo=png_info(png_settings(settings)),
                              overwrite=opts["overwrite"])
            written.append({"path": str(out), "settings": settings})
            if not quiet and not as_json:
                typer.echo(f"wrote {out}", err=True)
    if as_json:
        typer.echo(json.dumps(written, indent=2, default=str))


def _load(task: type[Task], opts: dict, quiet: bool):
    from editsuite.bundle.loader import load_bundle

    model = opts["model"]
    if model is None:
        from editsuite.demo import NOT_INSTALLED, NOTICE, TASK_KIND, demo_model

        model = demo_model(TASK_KIND[task.name])
        if model is None:
            raise UserError(NOT_INSTALLED)
        if not quiet:
            typer.echo(NOTICE.format(kind=TASK_KIND[task.name].value), err=True)
    from editsuite.bundle.coreml_layout import is_coreml_folder

    if opts["compute_units"] != "all" and not is_coreml_folder(Path(model).expanduser()):
        raise UserError(f"--compute-units applies to Core ML bundles only (it picks where Core ML runs them); {model} "
                        "runs in PyTorch: leave it out, or use --device")
    bundle = load_bundle(model, backend=opts["backend"], device=opts["device"], dtype=opts["dtype"],
                         allow_pickle=opts["allow_pickle"], compute_units=opts["compute_units"],
                         config=opts["config"], prediction_type=opts["prediction_type"], vae=opts["vae"])
    if bundle.notice and not quiet:
        typer.echo(bundle.notice, err=True)
    bundle.cache_interval = opts["cache_interval"]
    return bundle


def _load_refiner(opts: dict, bundle):
    """--refiner: a second PyTorch model on the model's device, in its dtype."""
    from editsuite.bundle.loader import load_bundle

    if bundle.backend.name != "torch":
        raise UserError("--refiner runs on the PyTorch backend; pass a PyTorch model with --model")
    return load_bundle(opts["refiner"], backend="torch", device=bundle.device, dtype=bundle.compute_dtype,
                       allow_pickle=opts["allow_pickle"])


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
