"""`editsuite batch RECIPE`: run a recipe over its inputs, resumably; Ctrl-C stops after the current step."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import typer

from editsuite.batch import Batch, load_recipe


def run_batch(recipe_path: Path, *, dry_run: bool, overwrite: bool, quiet: bool, as_json: bool,
              ray: str | None = None) -> int:
    """`ray`: None (the recipe's engine), "" (Ray, at the recipe's address or a local instance) or an address."""
    recipe = load_recipe(recipe_path)
    engine = dict(engine="ray", address=ray or None) if ray is not None else {}
    batch = Batch(recipe, overwrite=overwrite, **engine)
    if batch.settings.engine == "ray" and not dry_run:
        from editsuite.batch.ray_engine import import_ray

        import_ray()  # not installed: one line, before anything is done
    say = (lambda msg: None) if quiet or as_json else (lambda msg: typer.echo(msg, err=True))
    if dry_run:
        rows = [dict(item=i.key, action=a, output=str(i.output), seed=i.seed) for i, a in batch.plan()]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            for r in rows:
                typer.echo(f"{r['action']:9s} {r['item']} -> {r['output']} (seed {r['seed']})")
            own = recipe.own_outputs()
            if own:
                typer.echo(f"{len(own)} file(s) matched by inputs.images are this recipe's own outputs and are not "
                           "inputs")
            typer.echo(f"{sum(r['action'] == 'run' for r in rows)} of {len(rows)} items to run; nothing was done "
                       "(--dry-run)")
        return 0
    say(f"batch {recipe.label}: {len(batch.items)} items, {recipe.task}, output in {recipe.folder}")
    rate = _Rate()

    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        say("stopping: the items in progress are dropped, a rerun makes them (Ctrl-C again to abort now)"
            if batch.settings.engine == "ray" else "stopping after the current step (Ctrl-C again to abort now)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    counts = {"done": 0, "finished": 0, "failed": 0, "exists": 0}
    results = []
    try:
        from editsuite.cli.run import _Progress

        progress = None

        def on_step(item, step):
            nonlocal progress
            if progress is None or progress.label != item.key:
                if progress is not None:
                    progress.__exit__(None, None, None)
                progress = _Progress(item.key, quiet or as_json).__enter__()
            progress.step(step)

        for r in batch.run(should_stop=lambda: stop["asked"], on_step=on_step, on_notice=say):
            if progress is not None:
                progress.__exit__(None, None, None)
                progress = None
            counts[r.status] += 1
            results.append(dict(item=r.key, status=r.status, output=str(r.output) if r.output else None,
                                reason=r.reason))
            # the items to run: all but those finished before or in the way (the runner yields those first)
            todo = len(batch.items) - counts["finished"] - counts["exists"]
            if r.status == "done":
                say(f"done      {r.key} -> {r.output} ({r.seconds:.1f} s) {rate.add(r.status, r.seconds, todo)}")
            elif r.status == "failed":
                say(f"failed    {r.key}: {r.reason} {rate.add(r.status, r.seconds, todo)}")
            elif r.status == "exists":
                say(f"exists    {r.key}: {r.reason}")
    finally:
        signal.signal(signal.SIGINT, previous)
    left = len(batch.items) - sum(counts.values())
    summary = (f"batch {recipe.label}: {counts['done']} done, {counts['finished']} finished before, "
               f"{counts['failed']} failed, {counts['exists']} in the way, {left} left")
    if as_json:
        typer.echo(json.dumps({"summary": counts | {"left": left}, "items": results}, indent=2))
    if not quiet:
        typer.echo(summary + (" (stopped; run the same command again to finish)" if stop["asked"] else ""), err=True)
    if stop["asked"]:
        return 130
    return 1 if counts["failed"] or counts["exists"] else 0


class _Rate:
    """Items made or failed in this run, their pace (per second, from the first one to the last) and the time
    left at that pace; items refused before any picture is made do not count toward the pace."""

    def __init__(self):
        self.done, self.failed, self.first, self.paced = 0, 0, None, 0

    def add(self, status: str, seconds: float, todo: int) -> str:
        self.done += status == "done"
        self.failed += status == "failed"
        n, now = self.done + self.failed, time.time()
        if seconds > 0:  # an item a model worked on
            self.first = now if self.first is None else self.first
            self.paced += 1
        pace = ""
        if self.paced >= 2 and now > self.first:
            per_second = (self.paced - 1) / (now - self.first)
            left = max(todo - n, 0) / per_second
            eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
            pace = f", {per_second:.2f} items/s, ETA {eta}"
        return f"[{n}/{todo}, {self.failed} failed{pace}]"
