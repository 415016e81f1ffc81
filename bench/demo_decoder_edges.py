"""Experiment (issue 24): can the base VAE's decoder alone, tuned with an edge loss, give back sharper edges?
The encoder stays frozen, so the UNets' latents would not change and the family would need no retraining.
`python bench/demo_decoder_edges.py --steps 600 --lr 2e-4 --edge 1.0 --out build/vae-edges` tunes the installed
base's VAE decoder on whole 64 px training pictures (L1 + L2 + edge x the L1 of the finite differences) and
saves the VAE; then score it: a copy of `editsuite/demo/base` with that `vae/`, and
`python -m editsuite.demo.score --family <copy's folder> --only ceiling` (the exact pictures' round trip) and
`python bench/demo_guidance.py --family <...> --n 100 7.5`. Results: `logs/demo-decoder-edges.log`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from editsuite.demo import demo_model
from editsuite.demo.data import scenes, to_tensor
from editsuite.demo.fitting import lr_at
from editsuite.demo.scenes import render


def differences(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return t[..., :, 1:] - t[..., :, :-1], t[..., 1:, :] - t[..., :-1, :]


def main(argv=None) -> None:
    from editsuite import ModelKind

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--edge", type=float, default=1.0, help="weight of the edge (finite difference) loss")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    vae = AutoencoderKL.from_pretrained(demo_model(ModelKind.BASE) / "vae")
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    vae.train().requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=50)
        x = to_tensor(np.stack([render(s, 64) for s in scenes(32, rng, two_objects=0.6)]))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = vae.decode(z).sample.float()
        loss = (y - x).abs().mean() + (y - x).pow(2).mean()
        loss = loss + args.edge * sum((a - b).abs().mean() for a, b in zip(differences(y), differences(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    vae.eval().save_pretrained(args.out)
    print(f"saved {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
