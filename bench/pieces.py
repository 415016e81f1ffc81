"""What each of editsuite's CPU speed pieces gives, idle and with N background processes keeping cores busy
(issue 20): one SD 1.5 UNet step (512x512, batch 2 for guidance) and one VAE decode of a 512x512 picture,
bf16 weights, with the pieces switched on one at a time in one process.

    python bench/pieces.py [--load 0 1] [--repeat 3] [--what unet vae]

Variants (each builds on diffusers' plain bf16 setting: SDPA attention, glibc's malloc, torch's threads):
- `diffusers-bf16`: the reference (diffusers with bf16 weights, nothing else);
- `+kept-memory`: glibc keeps freed blocks for reuse (`speed.keep_freed_memory`);
- `+blocked`: editsuite's blocked attention for long self-attention (the default until issue 20), with kept memory;
- `+1-thread`: kept memory, SDPA, one torch thread (what an adaptive thread count picks when a core is busy);
- `+packed-convs`: kept memory, SDPA, convolution weights laid out for oneDNN once (`speed.pack_convolutions`);
- `+channels-last` (VAE only): kept memory, SDPA, NHWC activations for oneDNN's bf16 convolutions;
- `editsuite`: what editsuite's backend does by default, built by `TorchBackend` itself and called as the
  shared loop calls it (so the table follows the code).
Random weights with SD 1.5's architecture (`editsuite/configs/sd-v1`; timing needs no trained weights).
Each condition runs the variants interleaved, `--repeat` rounds; each timed call follows an untimed one in the
same state. It prints medians, the spread, and each variant's ratio against diffusers-bf16 in the same condition (>1: faster).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from blocked_attention import use_blocked_attention

from editsuite.bundle import speed

CONFIGS = Path(__file__).resolve().parents[1] / "editsuite" / "configs" / "sd-v1"
THREADS = torch.get_num_threads()


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _malloc(keep: bool) -> None:
    speed.keep_freed_memory()  # loads libc once; then switch between the two settings
    if speed._libc is not None:
        speed._libc.malloc_trim(0)
        speed._set_malloc(speed._libc, speed.KEEP if keep else speed.PLAIN)


def _variants(what: str):
    """name -> call(): each call puts the process in the variant's state, runs the module once untimed (so
    no variant pays for the previous one's thread pool or heap) and returns the seconds of a second run."""
    torch.manual_seed(0)
    if what == "unet":
        module = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
        args = (torch.randn(2, 4, 64, 64), torch.tensor(500), torch.randn(2, 77, 768))
    else:
        module = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
        args = (torch.randn(1, 4, 64, 64),)
    module = module.to(torch.bfloat16).eval().requires_grad_(False)
    args = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)
    packed = copy.deepcopy(module)
    speed.pack_convolutions(packed)

    from editsuite.bundle.torch_backend import TorchBackend

    # editsuite's own default, set up by its backend on a copy (the other two modules: stand-ins); its
    # float32-in, float32-out calls, as the shared loop makes them
    ours = TorchBackend(_stub(), copy.deepcopy(module) if what == "unet" else _stub(),
                        copy.deepcopy(module) if what == "vae" else _stub(), device=torch.device("cpu"),
                        dtype=torch.bfloat16)
    floats = tuple(a.float() if a.is_floating_point() else a for a in args)
    own = (lambda: ours.unet(*floats)) if what == "unet" else (lambda: ours.vae_decode(*floats))

    def variant(processor="sdpa", keep=False, threads=THREADS, channels_last=False, pack=False, call=None):
        m = packed if pack else module

        def run():
            if call is None:
                m.set_attn_processor(AttnProcessor2_0()) if processor == "sdpa" else use_blocked_attention(m)
                m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            _malloc(keep if call is None else True)
            torch.set_num_threads(threads)
            go = call or ((lambda: m(*args[:2], encoder_hidden_states=args[2])) if what == "unet"
                          else (lambda: m.decode(args[0])))
            go()
            t0 = time.perf_counter()
            go()
            return time.perf_counter() - t0
        return run

    variants = {
        "diffusers-bf16": variant(),
        "+kept-memory": variant(keep=True),
        "+blocked": variant(processor="blocked", keep=True),
        "+1-thread": variant(keep=True, threads=1),
        "+packed-convs": variant(keep=True, pack=True),
    }
    if what == "vae":
        variants["+channels-last"] = variant(keep=True, channels_last=True)
    variants["editsuite"] = variant(call=own)
    return variants


def _is_channels_last(module) -> bool:
    w = next(p for p in module.parameters() if p.ndim == 4)
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


class _Stub(torch.nn.Linear):
    """Stands in for the modules a variant does not time."""

    dtype = torch.bfloat16

    def __init__(self):
        super().__init__(1, 1, dtype=torch.bfloat16)


def _stub():
    return _Stub()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--what", nargs="+", choices=("unet", "vae"), default=["unet", "vae"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {THREADS} threads by default, SD 1.5 architecture, bf16, 512x512")
    for what in args.what:
        variants = _variants(what)
        for n in args.load:
            stop = mp.Event()
            loads = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
            for p in loads:
                p.start()
            times: dict[str, list[float]] = {k: [] for k in variants}
            try:
                with torch.inference_mode():
                    for _ in range(args.repeat):
                        for name, run in variants.items():
                            times[name].append(run())
            finally:
                stop.set()
                for p in loads:
                    p.join()
            base = statistics.median(times["diffusers-bf16"])
            label = "UNet step" if what == "unet" else "VAE decode"
            print(f"\n{label}, {n} busy process(es): median s (min-max), x = diffusers-bf16 time / this time")
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"  {name:15s} {med:7.2f} ({min(ts):.2f}-{max(ts):.2f})  x{base / med:.2f}", flush=True)


if __name__ == "__main__":
    main()
