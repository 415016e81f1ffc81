"""Experiment (issue 24): is the demo base short of its targets for want of training? The recipe's `base` stage
(its seed, data and steps, each times --scale) on the installed family's VAE, exported and scored as
`score.py --only txt2img` scores it (the first --n held-out prompts x seeds 0 and 1). Meant for a lent GPU, where
several times the CPU budget fits in minutes: `python bench/demo_budget.py --scale 3 --device cuda --work W`.
--seconds S: first time 60 steps, then lower --scale so the training takes about S seconds (on a GPU the probe
includes CUDA's start and overestimates a step twofold: run 1 of the log).
Results: `logs/demo-budget.log`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

import editsuite.demo.train as T
from editsuite.demo import ModelKind, demo_model, fitting
from editsuite.demo import score as S


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=None, help="the base's batch (the recipe's: 64)")
    args = ap.parse_args(argv)
    fitting.DEVICE = torch.device(args.device)
    if args.batch:
        train_unet = T.train_unet
        T.train_unet = lambda *a, **k: train_unet(*a, **k | {"batch": args.batch})
    vae = AutoencoderKL.from_pretrained(demo_model(ModelKind.BASE) / "vae", torch_dtype=torch.float32)
    vae.save_pretrained(args.work / "vae")
    scale = args.scale
    if args.seconds:
        vae.save_pretrained(args.work / "probe" / "vae")
        probe = T.run_stage(T.Trainer(args.work / "probe", 0.02), "base")  # 60 steps on 800 scenes
        per_step = probe / 60
        scale = min(scale, args.seconds / (3000 * per_step))
        print(f"probe: {per_step * 1000:.0f} ms a step (data included); scale {scale:.2f}", flush=True)
    trainer = T.Trainer(args.work, scale)
    trainer.dest = args.work / "family"
    seconds = T.run_stage(trainer, "base")
    T.run_stage(trainer, "export")
    print(f"base at scale {scale:.2f}: {trainer.n(3000)} steps on {trainer.n(40000)} scenes, {seconds:.0f} s",
          flush=True)
    S.FAMILY = trainer.dest
    S.RUN["device"] = args.device
    print("txt2img", json.dumps(S.score_txt2img(args.n)), flush=True)


if __name__ == "__main__":
    main()
