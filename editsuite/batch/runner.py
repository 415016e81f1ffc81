"""Running a recipe so that nothing is lost: resumable, journaled, atomic, one bad item never stops the rest.

- Every output is written to a hidden temporary file in the output folder and renamed into place
  (`save_atomic`), so the folder only ever holds whole files; temporary files left by a killed run are
  removed when the next run starts.
- The journal (`.editsuite-batch.jsonl` in the output folder) gets one fsynced line per finished or failed
  item. A torn last line (the process killed mid-write) is ignored.
- On a rerun an item whose output exists is done if the journal says so, or if the file's own metadata
  names this recipe's fingerprint and the item (the process died between the rename and the journal line).
  Any other existing file is never overwritten unless asked.
- A bad item (corrupt image, mask of another size, ...) is recorded with its reason and the batch goes on.
- `should_stop()` is polled after every denoising step: Ctrl-C stops after the current step.
- The items run in this process (the local engine) or on a pool of Ray workers (`engine="ray"`,
  ray_engine.py); either way this process writes the outputs and the journal, so both resume each other's runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from editsuite.batch.recipe import Item, Recipe, run_settings
from editsuite.errors import UserError

JOURNAL = ".editsuite-batch.jsonl"
TEMP_PREFIX = ".editsuite-batch-{fingerprint}-"  # this recipe's temporary files: only these are cleaned up


@dataclasses.dataclass
class ItemResult:
    key: str
    status: str  # "done" (made now), "finished" (made by an earlier run), "failed", "exists"
    output: Path | None = None
    reason: str | None = None
    seconds: float = 0.0


class Journal:
    def __init__(self, folder: Path, fingerprint: str):
        self.path = folder / JOURNAL
        self.fingerprint = fingerprint

    def _check(self) -> None:
        """The journal is a plain file or nothing: a link planted there would have it append elsewhere."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise UserError(f"{self.path} is not a plain file (a link or a folder); remove it and run again")

    def finished(self) -> dict[str, dict]:
        """The last record of every item, from runs of this same recipe."""
        out: dict[str, dict] = {}
        self._check()
        if not self.path.is_file():
            return out
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line torn by a kill
                continue
            if isinstance(rec, dict) and rec.get("fingerprint") == self.fingerprint and isinstance(rec.get("item"), str):
                out[rec["item"]] = rec
        return out

    def record(self, **fields) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"fingerprint": self.fingerprint, "time": round(time.time(), 3), **fields}) + "\n"
        self._check()
        try:  # O_NOFOLLOW: a link put there between the check and the open is refused too
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise UserError(f"cannot write the journal {self.path} ({e.strerror}); it must be a plain file") from None
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            if f.tell() and not self._ends_with_newline():
                f.write("\n")  # after a torn line, start clean
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def _made_by(path: Path, fingerprint: str, key: str) -> bool:
    from editsuite.imaging.metadata import read_settings

    try:
        batch = read_settings(path).get("batch") or {}
    except Exception:  # unreadable or foreign file: not ours
        return False
    return batch.get("fingerprint") == fingerprint and batch.get("item") == key


class Batch:
    """A recipe, ready to run. `Batch(recipe).run()` yields one `ItemResult` per item as it finishes; the
    model is loaded once (or pass `bundle`), and prompt encodings are reused across items."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, bundle=None, engine: str | None = None,
                 address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None):
        self.recipe, self.overwrite, self.bundle = recipe, overwrite, bundle
        # where the items run: the recipe's [run] table, with what the caller gives taking precedence (the
        # local engine, asked for, ignores the recipe's Ray settings)
        given = {k: v for k, v in dict(engine=engine, address=address, workers=workers,
                                       gpus_per_worker=gpus_per_worker).items() if v is not None}
        own = {} if engine == "local" else {k: v for k, v in dataclasses.asdict(recipe.run).items() if v is not None}
        self.settings = run_settings(recipe.label, {**own, **given})
        self.items: list[Item] = recipe.items()
        self.fingerprint = recipe.fingerprint()
        self.journal = Journal(recipe.folder, self.fingerprint)
        self.temp_prefix = TEMP_PREFIX.format(fingerprint=self.fingerprint[:16])

    def plan(self, records: dict | None = None) -> list[tuple[Item, str]]:
        """(item, action) for every item: "run", "finished" (done before) or "exists" (a file in the way)."""
        records = self.journal.finished() if records is None else records
        out = []
        for item in self.items:
            rec = records.get(item.key)
            if item.output.exists():
                ours = (rec is not None and rec.get("status") == "done" and rec.get("output") == item.output.name) \
                    or _made_by(item.output, self.fingerprint, item.key)
                out.append((item, "finished" if ours else ("run" if self.overwrite else "exists")))
            else:
                out.append((item, "run"))
        return out

    def _load(self):
        if self.bundle is None:
            self.bundle = load_model(self.recipe)
        return self.bundle

    def _clean_temporaries(self) -> None:
        if self.recipe.folder.is_dir():
            for p in self.recipe.folder.iterdir():
                if p.name.startswith(self.temp_prefix) and p.name.endswith(".tmp") and p.is_file():
                    p.unlink(missing_ok=True)

    def _precheck(self, item: Item) -> None:
        """Refuse what can be refused before the model loads: missing files, huge inputs and outputs."""
        from editsuite.imaging.io import peek_size
        from editsuite.imaging.output import check_output_size
        from editsuite.tasks import TASKS

        sizes = {what: peek_size(path, what=what, max_pixels=self.recipe.max_pixels)
                 for path, what in ((item.image, "image"), (item.mask, "mask")) if path is not None}
        out = TASKS[self.recipe.task].output_size(self.recipe.params, sizes.get("image"))
        if out is not None:
            check_output_size([out], 1, self.recipe.max_output_pixels)

    def run(self, *, should_stop: Callable[[], bool] = lambda: False, on_step: Callable | None = None,
            on_notice: Callable[[str], None] | None = None) -> Iterator[ItemResult]:
        """Run the items not finished yet, yielding each result as it comes. `on_step(item, step)` is called
        after every denoising step (the local engine); `on_notice(text)` gets what the engine has to say (the
        Ray engine: its workers, a worker lost and its items given to another)."""
        todo: list[Item] = []
        yield from self._prepare(todo)
        if not todo:
            return
        if self.settings.engine == "ray":
            from editsuite.batch.ray_engine import run_on_ray

            yield from run_on_ray(self, todo, should_stop, on_notice or (lambda text: None))
            return
        yield from self._run_here(todo, should_stop, on_step)

    def _prepare(self, todo: list[Item]) -> Iterator[ItemResult]:
        """Yield the items that need no model (finished before, in the way, refused by the precheck) and
        append the rest to `todo`."""
        from editsuite.imaging.output import check_writable

        self._clean_temporaries()
        records = self.journal.finished()
        plan = self.plan(records)
        if any(action == "run" for _, action in plan):
            check_writable(self.recipe.folder)  # before the journal and the model: a read-only folder, one line
        for item, action in plan:
            if action == "finished":
                rec = records.get(item.key)
                if rec is None or rec.get("status") != "done":  # renamed but not journaled before a kill
                    self.journal.record(item=item.key, status="done", output=item.output.name, seed=item.seed)
                yield ItemResult(item.key, "finished", item.output)
            elif action == "exists":
                yield ItemResult(item.key, "exists", item.output,
                                 f"{item.output} exists and was not written by this recipe; pass --overwrite to "
                                 "replace it")
            else:
                try:
                    self._precheck(item)
                except UserError as e:
                    yield self.failed(item, str(e))
                    continue
                todo.append(item)

    def check_params(self, vae_scale_factor: int) -> None:
        """The rules that need the model (sizes: multiples of its VAE factor) fail the recipe once, not each item."""
        from editsuite.tasks import TASKS

        try:
            TASKS[self.recipe.task].validate(self.recipe.params, vae_scale_factor)
        except UserError as e:
            raise UserError(f"{self.recipe.label}: [params] for this model: {e}") from None

    def failed(self, item: Item, reason: str, seconds: float = 0.0) -> ItemResult:
        self.journal.record(item=item.key, status="failed", reason=reason)
        return ItemResult(item.key, "failed", None, reason, seconds)

    def _run_here(self, todo: list[Item], should_stop, on_step) -> Iterator[ItemResult]:
        from editsuite.core.loop import Cancelled

        task = make_task(self.recipe, self._load())
        self.check_params(task.bundle.manifest.vae_scale_factor)
        for item in todo:
            if should_stop():
                return
            t0 = time.time()
            try:
                inputs = open_inputs(self.recipe, item)
                image, settings = make_picture(self.recipe, self.fingerprint, task, item, inputs,
                                               lambda step: (on_step(item, step) if on_step else None,
                                                             not should_stop())[1])
            except Cancelled:
                return
            except UserError as e:
                yield self.failed(item, str(e), time.time() - t0)
                continue
            yield self.save(image, settings, item, time.time() - t0)

    def save(self, image, settings: dict, item: Item, seconds: float) -> ItemResult:
        """Write the item's picture atomically, then its journal line."""
        from editsuite.imaging.metadata import png_info, png_settings
        from editsuite.imaging.output import save_atomic

        save_atomic(image, item.output, pnginfo=png_info(png_settings(settings)), overwrite=self.overwrite,
                    temp_prefix=self.temp_prefix)
        self.journal.record(item=item.key, status="done", output=item.output.name, seed=item.seed)
        return ItemResult(item.key, "done", item.output, None, seconds)


# -- one item: shared by the local engine and the Ray workers ------------------------------------------------

def model_source(recipe: Recipe):
    """The recipe's model, or the built-in demo model for its task (None where that is not installed)."""
    from editsuite.demo import TASK_KIND, demo_model

    return recipe.model or demo_model(TASK_KIND[recipe.task])


def load_model(recipe: Recipe):
    from editsuite.bundle.loader import load_bundle

    model = model_source(recipe)
    if model is None:
        raise UserError(f"{recipe.label}: no model given and the built-in demo model is not installed")
    return load_bundle(model)


def make_task(recipe: Recipe, bundle):
    from editsuite.tasks import TASKS

    return TASKS[recipe.task](bundle, max_output_pixels=recipe.max_output_pixels)


def open_inputs(recipe: Recipe, item: Item) -> tuple:
    """The item's pictures, opened and checked: (image, mask), None where the task takes none."""
    from editsuite.imaging.io import open_image, open_mask

    image = open_image(item.image, max_pixels=recipe.max_pixels) if item.image is not None else None
    mask = open_mask(item.mask, max_pixels=recipe.max_pixels) if item.mask is not None else None
    return image, mask


def make_picture(recipe: Recipe, fingerprint: str, task, item: Item, inputs: tuple, callback=None):
    """The item's picture and the settings its PNG records. `callback(step)` returning False cancels."""
    image, mask = inputs
    args = dict(recipe.params, seed=item.seed, num_images=1)
    if callback is not None:
        args["callback"] = callback
    if not task.inputs:
        result = task.run(prompt=item.prompt, **args)
    elif "mask" in task.inputs:
        result = task.run(image, mask, **args)
    else:
        result = task.run(image, **args)
    settings = {**result.image_settings(0),
                "batch": {"recipe": recipe.label, "fingerprint": fingerprint, "item": item.key}}
    if item.image is not None:
        settings["input"] = item.key
    return result.images[0], settings
