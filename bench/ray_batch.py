"""Throughput of a batch: the local engine against Ray with 1 and 2 workers, same recipe, same run.

    python bench/ray_batch.py [--items 32] [--steps 20] [--rounds 3]

The recipe is txt2img on the built-in demo model, --items prompts of --steps steps each. Each configuration
runs in a fresh process of its own (the Ray ones start their own local Ray instance, as `editsuite batch
--ray` does), into an empty output folder, and the configurations are interleaved over --rounds rounds in
rotating order, so a drift of the machine's speed falls on all of them. Reported per configuration, medians
over the rounds (min-max):
- items per minute over the whole run, start-up included (Ray's start and each worker's model load): what a
  user waits for;
- items per minute at steady pace (from the first finished item to the last): what a long batch converges to;
- the fixed cost: the run's time less its items at steady pace (Ray's start, the model loads, the shutdown);
- ratios against the local engine measured in the same run, and the batch size from which the configuration
  finishes first (its fixed cost repaid by its pace).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "ray-batch"
CONFIGS = {"local": dict(engine="local"), "ray-1": dict(engine="ray", workers=1),
           "ray-2": dict(engine="ray", workers=2)}
COLOURS = ["red", "green", "blue", "yellow", "purple", "white", "orange", "black"]
SHAPES = ["circle", "square", "triangle"]


def write_recipe(folder: Path, items: int, steps: int) -> Path:
    prompts = [f"a {COLOURS[i % 8]} {SHAPES[i % 3]} on a {COLOURS[(i + 3) % 8]} background" for i in range(items)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.toml"
    path.write_text(f'task = "txt2img"\n[inputs]\nprompts = {json.dumps(prompts)}\n[params]\nsteps = {steps}\n'
                    f'[output]\nfolder = "out"\n[seed]\nbase = 1\n')
    return path


def child(config: str, recipe_path: Path) -> None:
    t0 = time.time()
    from editsuite.batch import Batch, load_recipe

    times = [time.time() - t0 for r in Batch(load_recipe(recipe_path), **CONFIGS[config]).run() if r.status == "done"]
    print(json.dumps(dict(config=config, n=len(times), total=time.time() - t0, first=times[0], last=times[-1])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=list(CONFIGS))
    ap.add_argument("--recipe", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.recipe)
        return
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; txt2img on the demo model, "
          f"{args.items} items x {args.steps} steps; {args.rounds} rounds, interleaved")
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    names = list(CONFIGS)
    for rnd in range(args.rounds):
        for config in names[rnd % len(names):] + names[:rnd % len(names)]:
            folder = OUT / f"{config}-{rnd}"
            shutil.rmtree(folder, ignore_errors=True)
            recipe = write_recipe(folder, args.items, args.steps)
            done = subprocess.run([sys.executable, __file__, "--child", config, "--recipe", str(recipe)],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["overall"] = 60 * result["n"] / result["total"]
            result["steady"] = 60 * (result["n"] - 1) / (result["last"] - result["first"])
            result["fixed"] = result["total"] - 60 * result["n"] / result["steady"]
            runs[config].append(result)
            print(f"round {rnd + 1} {config:6s} {result['n']} items in {result['total']:.1f} s: "
                  f"{result['overall']:.1f} items/min overall, {result['steady']:.1f} at steady pace, "
                  f"fixed cost {result['fixed']:.1f} s", flush=True)

    def med(config, key):
        values = [r[key] for r in runs[config]]
        return statistics.median(values), min(values), max(values)

    print("\nconfig  overall items/min    steady items/min    fixed cost s    vs local: overall  steady  "
          "finishes first from")
    local_steady, local_fixed = med("local", "steady")[0], med("local", "fixed")[0]
    for config in CONFIGS:
        o, s, f = med(config, "overall"), med(config, "steady"), med(config, "fixed")
        gain = 60 / local_steady - 60 / s[0]  # seconds saved per item at steady pace
        first = "-" if config == "local" else (f"{max(1, (f[0] - local_fixed) / gain):.0f} items" if gain > 0
                                               else "never")
        print(f"{config:6s}  {o[0]:5.1f} ({o[1]:.1f}-{o[2]:.1f})   {s[0]:5.1f} ({s[1]:.1f}-{s[2]:.1f})   "
              f"{f[0]:4.1f} ({f[1]:.1f}-{f[2]:.1f})    {o[0] / med('local', 'overall')[0]:.2f}x    "
              f"{s[0] / local_steady:.2f}x   {first}")


if __name__ == "__main__":
    main()
