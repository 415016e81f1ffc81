"""Experiment (issue 24): the recipe's vae and vaetune stages (same steps, seeds and data) with another number of
latent channels, and the exact pictures' round trip through the result judged as the score's reference part
judges it (`score_ceiling`): does a wider latent give back the edges the 4-channel VAE blurs?
`python bench/demo_vae_channels.py --channels 8 --work build/vae8`. Results: `logs/demo-vae-channels.log`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffusers import AutoencoderKL

import editsuite.demo.train as T
from editsuite.demo import score as S
from editsuite.demo.models import make_vae


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args(argv)
    T.make_vae = lambda: AutoencoderKL.from_config({**make_vae().config, "latent_channels": args.channels})
    trainer = T.Trainer(args.work, 1.0)
    for stage in (trainer.vae, trainer.vaetune):
        t0 = time.time()
        stage()
        print(f"{stage.__name__} {time.time() - t0:.0f} s", flush=True)
    print("reference", json.dumps(S.score_ceiling(200, S._vae_round_trip(args.work / "vae"))), flush=True)


if __name__ == "__main__":
    main()
