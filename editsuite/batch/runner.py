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
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from editsuite.batch.recipe import Item, Recipe
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

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, bundle=None):
        self.recipe, self.overwrite, self.bundle = recipe, overwrite, bundle
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
            from editsuite.bundle.loader import load_bundle
            from editsuite.demo import TASK_KIND, demo_model

            model = self.recipe.model or demo_model(TASK_KIND[self.recipe.task])
            if model is None:
                raise UserError(f"{self.recipe.label}: no model given and the built-in demo model is not installed")
            self.bundle = load_bundle(model)
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

    def run(self, *, should_stop: Callable[[], bool] = lambda: False,
            on_step: Callable | None = None) -> Iterator[ItemResult]:
        from editsuite.core.loop import Cancelled

        from editsuite.imaging.output import check_writable

        self._clean_temporaries()
        records = self.journal.finished()
        plan = self.plan(records)
        if any(action == "run" for _, action in plan):
            check_writable(self.recipe.folder)  # before the journal and the model: a read-only folder, one line
        todo = []
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
                    self.journal.record(item=item.key, status="failed", reason=str(e))
                    yield ItemResult(item.key, "failed", None, str(e))
                    continue
                todo.append(item)
        if not todo:
            return
        task = self._task()
        try:  # the rules that need the model (sizes: multiples of its VAE factor) fail the recipe once, not each item
            type(task).validate(self.recipe.params, task.bundle.manifest.vae_scale_factor)
        except UserError as e:
            raise UserError(f"{self.recipe.label}: [params] for this model: {e}") from None
        for item in todo:
            if should_stop():
                return
            t0 = time.time()
            try:
                image, settings = self._one(task, item, should_stop, on_step)
            except Cancelled:
                return
            except UserError as e:
                self.journal.record(item=item.key, status="failed", reason=str(e))
                yield ItemResult(item.key, "failed", None, str(e), time.time() - t0)
                continue
            self._save(image, settings, item)
            yield ItemResult(item.key, "done", item.output, None, time.time() - t0)

    def _task(self):
        from editsuite.tasks import TASKS

        return TASKS[self.recipe.task](self._load(), max_output_pixels=self.recipe.max_output_pixels)

    def _one(self, task, item: Item, should_stop, on_step):
        from editsuite.imaging.io import open_image, open_mask

        r = self.recipe
        args = dict(r.params, seed=item.seed, num_images=1)
        args["callback"] = lambda step: (on_step(item, step) if on_step else None, not should_stop())[1]
        if not task.inputs:
            result = task.run(prompt=item.prompt, **args)
        else:
            image = open_image(item.image, max_pixels=r.max_pixels)
            if "mask" in task.inputs:
                mask = open_mask(item.mask, max_pixels=r.max_pixels)
                result = task.run(image, mask, **args)
            else:
                result = task.run(image, **args)
        settings = {**result.image_settings(0),
                    "batch": {"recipe": r.label, "fingerprint": self.fingerprint, "item": item.key}}
        if item.image is not None:
            settings["input"] = item.key
        return result.images[0], settings

    def _save(self, image, settings: dict, item: Item) -> None:
        from editsuite.imaging.metadata import png_info, png_settings
        from editsuite.imaging.output import save_atomic

        save_atomic(image, item.output, pnginfo=png_info(png_settings(settings)), overwrite=self.overwrite,
                    temp_prefix=self.temp_prefix)
        self.journal.record(item=item.key, status="done", output=item.output.name, seed=item.seed)
