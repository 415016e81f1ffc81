"""`editsuite batch RECIPE`: run a recipe over its inputs, resumably; Ctrl-C stops after the current step."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import typer

from editsuite.batch import Batch, load_recipe


def run_batch(recipe_path: Path, *, dry_run: bool, overwrite: bool, quiet: bool, as_json: bool) -> int:
    recipe = load_recipe(recipe_path)
    batch = Batch(recipe, overwrite=overwrite)
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

    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        say("stopping after the current step (Ctrl-C again to abort now)")

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

        for r in batch.run(should_stop=lambda: stop["asked"], on_step=on_step):
            if progress is not None:
                progress.__exit__(None, None, None)
                progress = None
            counts[r.status] += 1
            results.append(dict(item=r.key, status=r.status, output=str(r.output) if r.output else None,
                                reason=r.reason))
            if r.status == "done":
                say(f"done      {r.key} -> {r.output} ({r.seconds:.1f} s)")
            elif r.status in ("failed", "exists"):
                say(f"{r.status:9s} {r.key}: {r.reason}")
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
