"""Batch recipes: one edit over many inputs, described in a TOML file (`tasks/*.toml`).

    task = "inpaint"                 # txt2img, img2img, inpaint, outpaint, upscale
    model = "path/to/model"          # optional: default the built-in demo model; relative to the recipe
    max_pixels = 40000000            # optional: inputs with more pixels are refused
    max_output_pixels = 16777216     # optional: an item whose picture would have more pixels is refused

    [inputs]
    images = ["photos/*.png", "more/"]   # files, folders and globs, relative to the recipe
    mask = "mask.png"                    # inpaint: one mask for every image ...
    masks = "masks/{stem}.png"           # ... or a mask per image, found by the image's name
    prompts = ["a red circle", "..."]    # txt2img: one item per prompt

    [params]                         # the task's own parameters, as the task classes and the CLI take them
    prompt = "a wooden bench"
    steps = 20
    strength = 0.8

    [output]
    folder = "out/inpaint"           # relative to the recipe; every output stays inside it
    name = "{stem}-{task}-{seed}.png"    # fields: stem, index, task, seed

    [seed]
    base = 42
    mode = "derived"                 # derived: from base and the input's name (a rerun gives the same
                                     # picture per input); fixed: base for every item

    [run]                            # optional: where the items run (never changes the pictures)
    engine = "ray"                   # local (default): this process; ray: a pool of Ray workers
    address = "auto"                 # ray: a cluster to join ("auto", "host:6379", "ray://host:10001");
                                     # without it a local Ray instance is started
    workers = 4                      # ray: how many workers (default: what the cluster offers)
    gpus_per_worker = 1              # ray: GPUs each worker holds (default: 1 where the cluster has GPUs)

An error names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import string
import tomllib
from pathlib import Path
from typing import Any

from editsuite.errors import UserError
from editsuite.tasks.params import MAX_SEED, TYPE_NAMES, Param
from editsuite.imaging.io import DEFAULT_MAX_PIXELS
from editsuite.imaging.output import DEFAULT_MAX_OUTPUT_PIXELS, IMAGE_EXTENSIONS

TOP_KEYS = {"task", "model", "max_pixels", "max_output_pixels", "inputs", "params", "output", "seed", "run"}
INPUT_KEYS = {"images", "mask", "masks", "prompts"}
OUTPUT_KEYS = {"folder", "name"}
SEED_KEYS = {"base", "mode"}
RUN_KEYS = {"engine", "address", "workers", "gpus_per_worker"}
ENGINES = ("local", "ray")
NAME_FIELDS = {"stem", "index", "task", "seed"}
READ_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
NOT_PARAMS = {"seed", "num_images"}  # given per item, or one per item


@dataclasses.dataclass(frozen=True)
class Item:
    """One unit of a batch: its stable key, its inputs, its seed and its output path."""

    key: str
    index: int
    image: Path | None
    mask: Path | None
    prompt: str | None  # txt2img: the item's prompt
    seed: int
    output: Path


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The recipe's [run] table: which engine runs the items, and for Ray, where and on how many workers."""

    engine: str = "local"
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: Path
    task: str
    model: str | None
    max_pixels: int
    images: tuple[str, ...]
    mask: str | None
    masks: str | None
    prompts: tuple[str, ...]
    params: dict
    folder: Path
    name: str
    seed_base: int
    seed_mode: str
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS
    run: RunSettings = RunSettings()  # where the items run; not part of the fingerprint (the pictures are the same)

    @property
    def label(self) -> str:
        return self.path.name

    def fingerprint(self) -> str:
        """What makes the outputs what they are: a rerun with the same fingerprint may reuse finished items."""
        data = dict(task=self.task, model=self.model, params=self.params, seed=[self.seed_base, self.seed_mode],
                    name=self.name, mask=self.mask, masks=self.masks)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def items(self) -> list[Item]:
        """Expand the inputs into items, with seeds and output paths; checks names stay in the folder."""
        base = self.path.parent
        if not takes_pictures(self.task):
            sources = [(f"prompt-{i:04d}", None, p) for i, p in enumerate(self.prompts)]
        else:
            own = self._own_output_test()
            sources = [(_key(p, base), p, None) for p in _expand(self.images, base, self.label) if not own(p)]
        items, names = [], {}
        for index, (key, image, prompt) in enumerate(sources):
            seed = self.seed_base if self.seed_mode == "fixed" else derived_seed(self.seed_base, key)
            stem = image.stem if image is not None else f"prompt{index:04d}"
            output = self._output(stem=stem, index=index, seed=seed)
            if output.name in names:
                raise UserError(f"{self.label}: output.name {self.name!r} gives {output.name!r} to both "
                                f"{names[output.name]} and {key}; add {{index}} or {{stem}} to it")
            names[output.name] = key
            mask = None
            if self.mask is not None:
                mask = base / self.mask
            elif self.masks is not None and image is not None:
                mask = base / self.masks.format(stem=image.stem, name=image.name)
            items.append(Item(key, index, image, mask, prompt, seed, output))
        return items

    def own_outputs(self) -> list[Path]:
        """The files the inputs match that are this recipe's own outputs (left out of the items)."""
        if not takes_pictures(self.task):
            return []
        own = self._own_output_test()
        return [p for p in _expand(self.images, self.path.parent, self.label) if own(p)]

    def _own_output_test(self):
        """Whether a path is a picture this recipe wrote: in its output folder, with its fingerprint in the
        picture's metadata. Such files are never inputs, so a folder that is both input and output does not
        grow with every rerun."""
        from editsuite.imaging.metadata import read_settings

        folder, fingerprint = self.folder.resolve(), self.fingerprint()

        def own(path: Path) -> bool:
            if Path(path).resolve().parent != folder:
                return False
            try:
                batch = read_settings(path).get("batch") or {}
            except Exception:  # unreadable or foreign file: an input like any other
                return False
            return isinstance(batch, dict) and batch.get("fingerprint") == fingerprint

        return own

    def _output(self, **fields) -> Path:
        name = self.name.format(task=self.task, **fields)
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):  # NUL and control characters: no file can have them
            raise UserError(f"{self.label}: output.name {self.name!r} gives {name!r}, which holds control characters; "
                            "use letters, digits and punctuation")
        path = (self.folder / name).resolve()
        if path.parent != self.folder.resolve() or name.startswith(".") or not Path(name).suffix.lower() in IMAGE_EXTENSIONS:
            raise UserError(f"{self.label}: output.name {self.name!r} gives {name!r}, which is not a file name inside "
                            f"output.folder ending in {', '.join(IMAGE_EXTENSIONS)}")
        return path


def derived_seed(base: int, key: str) -> int:
    """A seed per input from the base seed and the input's name: stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(f"{base}/{key}".encode()).digest()[:4], "big") % (MAX_SEED + 1)


def _key(path: Path, base: Path) -> str:
    """The input's path relative to the recipe: the same on every machine and checkout, so derived seeds are."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _expand(entries, base: Path, label: str) -> list[Path]:
    found: dict[Path, None] = {}
    for entry in entries:
        target = base / entry
        if any(ch in entry for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(target), recursive=True))
            matches = [m for m in matches if m.is_file() and m.suffix.lower() in READ_EXTENSIONS]
        elif target.is_dir():
            matches = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in READ_EXTENSIONS
                             and not p.name.startswith("."))
        elif target.is_file():
            matches = [target]
        else:
            raise UserError(f"{label}: inputs.images entry {entry!r}: no such file or folder (paths are relative to "
                            f"the recipe's folder {base})")
        if not matches:
            raise UserError(f"{label}: inputs.images entry {entry!r} matches no image "
                            f"({', '.join(sorted(READ_EXTENSIONS))})")
        for m in matches:
            found[m] = None
    return list(found)


# -- reading and checking ----------------------------------------------------------------------------------

def _fail(label: str, key: str, value: Any, allowed: str):
    raise UserError(f"{label}: {key} = {value!r} is not allowed: {allowed}")


def _table(label: str, data: dict, name: str, keys: set) -> dict:
    table = data.get(name, {})
    if not isinstance(table, dict):
        _fail(label, name, table, f"[{name}] must be a table with keys {', '.join(sorted(keys))}")
    unknown = sorted(set(table) - keys)
    if unknown:
        _fail(label, f"{name}.{unknown[0]}", table[unknown[0]], f"[{name}] takes {', '.join(sorted(keys))}")
    return table


def takes_pictures(task: str) -> bool:
    """Whether the edit's items are pictures (inputs.images) or prompts (inputs.prompts)."""
    from editsuite.tasks import TASKS

    return bool(TASKS[task].inputs)


def task_parameters(task: str) -> dict[str, Param]:
    """The parameters a recipe may set for `task`: the task's own definitions, less those given per item (the
    seed; the prompt too where the items are prompts)."""
    from editsuite.tasks import TASKS

    per_item = NOT_PARAMS if takes_pictures(task) else NOT_PARAMS | {"prompt"}
    return {p.name: p for p in TASKS[task].params if p.name not in per_item}


def check_params(label: str, task: str, params: dict) -> dict:
    """Each value through its parameter's definition (type, range, choices, rule), then the rules between
    parameters; the model's own rules (sizes a multiple of its VAE factor) wait for the model."""
    from editsuite.tasks import TASKS

    allowed = task_parameters(task)
    for key, value in params.items():
        if key not in allowed:
            extra = {"seed": " (the seed is set in [seed]; a batch writes one image per item)",
                     "num_images": " (a batch writes one image per item)",
                     "prompt": " (each item's prompt comes from inputs.prompts)"}.get(key, "")
            _fail(label, f"params.{key}", value, f"{task} takes {', '.join(sorted(allowed))}{extra}")
        p = allowed[key]
        if not p.accepts(value):
            _fail(label, f"params.{key}", value, f"it must be {TYPE_NAMES[p.kind]}")
        choices = p.allowed()
        if choices is not None and value not in choices:
            _fail(label, f"params.{key}", value, f"use one of {', '.join(choices)}")
        try:
            p.validate(value)
        except UserError as e:
            _fail(label, f"params.{key}", value, str(e))
    try:
        TASKS[task].validate(params)
    except UserError as e:
        raise UserError(f"{label}: [params]: {e}") from None
    return dict(params)


def load_recipe(path: str | Path) -> Recipe:
    from editsuite.tasks import TASKS

    path = Path(path)
    label = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path} cannot be read ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{label} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        _fail(label, unknown[0], data[unknown[0]], f"a recipe has the keys {', '.join(sorted(TOP_KEYS))}")
    task = data.get("task")
    if not isinstance(task, str) or task not in TASKS:
        _fail(label, "task", task, f"use one of {', '.join(TASKS)}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        _fail(label, "model", model, "a path or hub id, as a string")
    if model is not None and not Path(model).is_absolute() and (path.parent / model).exists():
        model = str(path.parent / model)
    max_pixels = data.get("max_pixels", DEFAULT_MAX_PIXELS)
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        _fail(label, "max_pixels", max_pixels, "a positive integer")
    max_output_pixels = data.get("max_output_pixels", DEFAULT_MAX_OUTPUT_PIXELS)
    if not isinstance(max_output_pixels, int) or isinstance(max_output_pixels, bool) or max_output_pixels < 1:
        _fail(label, "max_output_pixels", max_output_pixels, "a positive integer")

    inputs = _table(label, data, "inputs", INPUT_KEYS)
    images = inputs.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        _fail(label, "inputs.images", images, "a list of file, folder or glob strings")
    prompts = inputs.get("prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        _fail(label, "inputs.prompts", prompts, "a list of strings")
    if not takes_pictures(task):
        if images:
            _fail(label, "inputs.images", images, f"{task} takes no images; list inputs.prompts")
        if not prompts:
            _fail(label, "inputs.prompts", prompts, f"{task} needs at least one prompt")
    else:
        if not images:
            _fail(label, "inputs.images", images, f"{task} needs at least one image, folder or glob")
        if prompts:
            _fail(label, "inputs.prompts", prompts, f"only txt2img takes inputs.prompts; use params.prompt for {task}")
    mask, masks = inputs.get("mask"), inputs.get("masks")
    for key, value in (("inputs.mask", mask), ("inputs.masks", masks)):
        if value is not None and (not isinstance(value, str) or not value):
            _fail(label, key, value, "a path string")
    masked = "mask" in TASKS[task].inputs
    if masked and (mask is None) == (masks is None):
        _fail(label, "inputs.mask", mask, "inpaint needs exactly one of inputs.mask (shared) or inputs.masks "
                                          "(a pattern such as 'masks/{stem}.png')")
    if not masked and (mask is not None or masks is not None):
        _fail(label, "inputs.mask", mask or masks, f"only inpaint takes a mask, not {task}")
    if mask is not None and not (path.parent / mask).is_file():
        _fail(label, "inputs.mask", mask, f"an existing mask file (paths are relative to {path.parent})")
    if masks is not None:
        _check_pattern(label, "inputs.masks", masks, {"stem", "name"})

    params = data.get("params", {})
    if not isinstance(params, dict):
        _fail(label, "params", params, "[params] must be a table of the task's parameters")
    params = check_params(label, task, params)

    output = _table(label, data, "output", OUTPUT_KEYS)
    folder = output.get("folder")
    if not isinstance(folder, str) or not folder:
        _fail(label, "output.folder", folder, "a folder path string (relative to the recipe)")
    default_name = "{stem}-{task}-{seed}.png" if takes_pictures(task) else "{index:04d}-{task}-{seed}.png"
    name = output.get("name", default_name)
    if not isinstance(name, str) or not name:
        _fail(label, "output.name", name, "a file name pattern string")
    _check_pattern(label, "output.name", name, NAME_FIELDS)

    seed = _table(label, data, "seed", SEED_KEYS)
    seed_base = seed.get("base", 0)
    if not isinstance(seed_base, int) or isinstance(seed_base, bool) or not 0 <= seed_base <= MAX_SEED:
        _fail(label, "seed.base", seed_base, f"an integer from 0 to {MAX_SEED}")
    seed_mode = seed.get("mode", "derived")
    if seed_mode not in ("derived", "fixed"):
        _fail(label, "seed.mode", seed_mode, "derived or fixed")

    recipe = Recipe(path=path, task=task, model=model, max_pixels=max_pixels, images=tuple(images), mask=mask,
                    masks=masks, prompts=tuple(prompts), params=params, folder=Path(os.path.normpath(path.parent / folder)),
                    name=name, seed_base=seed_base, seed_mode=seed_mode, max_output_pixels=max_output_pixels,
                    run=run_settings(label, _table(label, data, "run", RUN_KEYS)))
    recipe._output(stem="x", index=0, seed=0)  # a bad name pattern fails now, not on the first item
    return recipe


def run_settings(label: str, run: dict) -> RunSettings:
    engine = run.get("engine", "local")
    if engine not in ENGINES:
        _fail(label, "run.engine", engine, " or ".join(ENGINES))
    address = run.get("address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        _fail(label, "run.address", address, 'a Ray address string such as "auto" or "10.0.0.5:6379"')
    workers = run.get("workers")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 4096):
        _fail(label, "run.workers", workers, "an integer from 1 to 4096")
    gpus = run.get("gpus_per_worker")
    if gpus is not None and (not isinstance(gpus, (int, float)) or isinstance(gpus, bool) or not 0 <= gpus <= 64
                             or (gpus > 1 and gpus != int(gpus))):
        _fail(label, "run.gpus_per_worker", gpus, "0 (CPU workers), a fraction up to 1 (workers sharing a GPU) or a "
                                                 "whole number up to 64")
    if engine == "local" and (address, workers, gpus) != (None, None, None):
        key = next(k for k in ("address", "workers", "gpus_per_worker") if k in run)
        _fail(label, f"run.{key}", run[key], 'only the Ray engine takes it; add engine = "ray" to [run]')
    return RunSettings(engine, address, workers, gpus)


def _check_pattern(label: str, key: str, pattern: str, fields: set) -> None:
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as e:
        _fail(label, key, pattern, f"a pattern with {{fields}} ({e})")
    used = [f for _, f, _, _ in parsed if f is not None]
    widths = [int(n) for _, _, spec, _ in parsed if spec for n in re.findall(r"\d+", spec)]
    if any(w > 64 for w in widths):  # "{seed:>99999999}" would build a 100 MB name
        _fail(label, key, pattern, "a pattern whose widths are at most 64")
    bad = [f for f in used if f not in fields]
    if bad:
        _fail(label, key, pattern, f"fields are {', '.join('{' + f + '}' for f in sorted(fields))}, not {{{bad[0]}}}")
    try:
        sample = pattern.format(**{f: 0 if f in ("index", "seed") else "x" for f in fields})
    except (ValueError, IndexError, KeyError) as e:
        _fail(label, key, pattern, f"a valid pattern ({e})")
    if len(sample.encode("utf-8", "surrogateescape")) > 200:  # file systems allow 255 bytes a name
        _fail(label, key, pattern, "a pattern giving names of at most 200 bytes")
