"""One SD 1.5 UNet step (512x512, batch 2 for guidance, bfloat16 weights as editsuite's CPU default runs them)
with each attention processor, idle and with N background processes keeping cores busy. Issue 20: does the
blocked attention that wins on an idle machine collapse when a core is shared, and does SDPA?

    python bench/unet_load.py [--load 0 1] [--repeat 3]

Random weights with SD 1.5's architecture (editsuite/configs/sd-v1/unet; timing needs no trained weights).
Each condition runs the processors interleaved, `--repeat` rounds after one warm-up step each, and prints
medians, the spread, and each processor's ratio against diffusers' own (SDPA) in the same condition.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from blocked_attention import use_blocked_attention

from editsuite.bundle import speed

CONFIG = Path(__file__).resolve().parents[1] / "editsuite" / "configs" / "sd-v1" / "unet"


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def set_processor(unet, name: str) -> None:
    if name == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    else:
        use_blocked_attention(unet)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plain-malloc", action="store_true", help="leave glibc's malloc as it is (diffusers' case)")
    args = ap.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG)).to(torch.bfloat16).eval()
    if not args.plain_malloc:
        speed.keep_freed_memory()  # as editsuite's backend does on a CPU
    sample = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    context = torch.randn(2, 77, 768, dtype=torch.bfloat16)
    t = torch.tensor(500)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD 1.5 UNet bf16, 512x512, batch 2, "
          f"{'plain' if args.plain_malloc else 'kept-memory'} malloc")
    for n in args.load:
        stop = mp.Event()
        loads = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
        for p in loads:
            p.start()
        times: dict[str, list[float]] = {"blocked": [], "sdpa": []}
        try:
            with torch.inference_mode():
                for name in times:  # warm-up
                    set_processor(unet, name)
                    unet(sample, t, context)
                for _ in range(args.repeat):
                    for name in times:
                        set_processor(unet, name)
                        t0 = time.perf_counter()
                        unet(sample, t, context)
                        times[name].append(time.perf_counter() - t0)
        finally:
            stop.set()
            for p in loads:
                p.join()
        base = statistics.median(times["sdpa"])
        print(f"\nload {n} busy process(es): median s (min-max), ratio = sdpa time / this time")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:8s} {med:7.2f} ({min(ts):.2f}-{max(ts):.2f})  x{base / med:.2f}", flush=True)


if __name__ == "__main__":
    main()
