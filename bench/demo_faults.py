"""Why the demo base model's txt2img pictures fail the strict evaluator: each held-out prompt's named objects,
counted by their first fault (`python bench/demo_faults.py --n 200`). A diagnosis for the next recipe, not a
score: the score is `python -m editsuite.demo.score`.

Faults, per named object: its colour missing, or there twice (two regions, or two objects); its shape read
otherwise, with the rules it broke (nearest template other than the asked one, fit, aspect, dents, edge);
right shape but not at the stated place or not of the stated size; else ok. Per picture: an extra object."""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from editsuite.demo import evaluate as E
from editsuite.demo import score as S
from editsuite.demo.data import heldout_prompts
from editsuite.demo.scenes import parse


def faults(picture, prompt: str) -> list[str]:
    found, spec = E.analyse(picture), parse(prompt)
    out = ["picture: extra object"] if len(found.objects) > len(spec["objects"]) else []
    for want in spec["objects"]:
        mine = [f for f in found.objects if f.colour == want["colour"]]
        if len(mine) != 1:
            out.append("colour missing" if not mine else "colour twice")
        elif mine[0].shape != want["shape"]:
            f = mine[0]
            broke = ([f"nearest={f.nearest}"] if f.nearest != want["shape"] else []) + E.broken_rules(
                f.nearest, f.fit, f.aspect, f.solidity, f.edge)
            out.append("shape: " + "+".join(broke))
        else:
            wrong = sorted(E.object_faults(mine[0], want, found.size))  # "place", "size": the shape is right
            out.append("not at its " + "+".join(wrong) if wrong else "ok")
    return out


def main(argv=None) -> None:
    from editsuite import ModelKind, Txt2Img

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None, help="default: the task's own")
    ap.add_argument("--family", type=Path, default=None, help="default: the installed family")
    args = ap.parse_args(argv)
    S.FAMILY = args.family
    S.RUN["guidance"] = args.guidance
    task = Txt2Img(S._load(ModelKind.BASE))
    counts: collections.Counter = collections.Counter()
    for prompt in heldout_prompts(args.n):
        counts.update(faults(task.run(prompt, **S._opts(args.seed)).images[0], prompt))
    named = sum(v for k, v in counts.items() if not k.startswith("picture"))
    print(f"{args.n} prompts, seed {args.seed}, {named} named objects")
    for k, v in counts.most_common():
        print(f"{v:5d}  {100 * v / named:5.1f} %  {k}")


if __name__ == "__main__":
    main()
