"""The demo base model's txt2img scores across guidance scales (strict evaluator, held-out prompts), to pick the
guidance its card reports beside the default: `python bench/demo_guidance.py --n 100 1 2 3 4 5 7.5 12`.
A quality sweep, not a timing: each line is one guidance, its scores and the seconds it took."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from editsuite.demo import score as S


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("guidance", type=float, nargs="+")
    ap.add_argument("--n", type=int, default=100, help="held-out prompts (the first n), one seed each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", type=Path, default=None, help="default: the installed family")
    args = ap.parse_args(argv)
    S.FAMILY = args.family
    for g in args.guidance:
        S.RUN["guidance"] = g
        t0 = time.time()
        print(g, json.dumps(S.score_txt2img(args.n, seeds=(args.seed,))), round(time.time() - t0), flush=True)


if __name__ == "__main__":
    main()
