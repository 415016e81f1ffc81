"""What each of editsuite's CPU speed pieces gives, idle and with N background processes keeping cores busy
(issue 20): one SD 1.5 UNet step (512x512, batch 2 for guidance) and one VAE decode of a 512x512 picture,
bf16 weights, each piece switched on alone.

    python bench/pieces.py [--load 0 1] [--rounds 3] [--repeat 2] [--what unet vae] [--variants A B ...]

Every measurement runs in a fresh child process (glibc's malloc as a fresh process has it: its dynamic mmap
threshold cannot be restored once changed, so pieces are never switched off and on in one process). Variants:
- `diffusers-bf16`: the reference, diffusers' module with bf16 weights and nothing else (SDPA attention);
- `+kept-memory`: glibc keeps freed blocks for reuse (`speed.keep_freed_memory`);
- `+packed-convs`: convolution weights laid out for oneDNN once (`speed.pack_convolutions`);
- `+packed-linears` (UNet only): bf16 Linear weights laid out for oneDNN once (`speed.pack_linears`);
- `+fused-qkv` (UNet only): diffusers' `fuse_qkv_projections`, one matmul for each attention's q, k and v;
- `+blocked`: the blocked attention editsuite used until issue 20 (bench/blocked_attention.py);
- `+1-thread`: one torch thread (what an adaptive thread count would pick with a core busy);
- `+channels-last`: NHWC activations for oneDNN's bf16 convolutions (the UNet: its sample in NHWC);
- `+cl+packed` (UNet only): channels-last with packed convolution and Linear weights;
- `editsuite`: editsuite's default as its backend sets it up, called as the shared loop calls it.
The model is SD 1.5's architecture with random weights (the folder bench/speed.py builds). Each condition runs
the variants interleaved, `--rounds` times; a child times `--repeat` calls after one warm-up and reports their
median. Printed: the median over rounds (min-max) and each variant's ratio against diffusers-bf16 in the same
condition (>1: faster). The busy processes are started and stopped here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "build" / "bench-coreml" / "sd15-random"
VARIANTS = {
    "unet": ("diffusers-bf16", "+kept-memory", "+packed-convs", "+packed-linears", "+channels-last", "+cl+packed",
             "+fused-qkv", "+blocked", "+1-thread", "editsuite"),
    "vae": ("diffusers-bf16", "+kept-memory", "+channels-last", "+packed-convs", "+blocked", "editsuite"),
}


def child(what: str, variant: str, repeat: int) -> float:
    """In a fresh process: set up `variant`, one warm-up call, the median of `repeat` timed calls."""
    import torch

    from editsuite.bundle import speed

    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(500)
    if variant == "editsuite":
        from editsuite import load_bundle

        backend = load_bundle(MODEL, device="cpu", dtype="bfloat16").backend
        call = (lambda: backend.unet(x, t, ctx)) if what == "unet" else (lambda: backend.vae_decode(z))
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cls = UNet2DConditionModel if what == "unet" else AutoencoderKL
        module = cls.from_pretrained(MODEL, subfolder=what, torch_dtype=torch.bfloat16).eval().requires_grad_(False)
        if variant == "+kept-memory":
            speed.keep_freed_memory()
        elif variant == "+packed-convs":
            speed.pack_convolutions(module)
        elif variant == "+packed-linears":
            speed.pack_linears(module)
        elif variant == "+cl+packed":
            speed.pack_convolutions(module)
            speed.pack_linears(module)
        elif variant == "+blocked":
            sys.path.insert(0, str(ROOT / "bench"))
            from blocked_attention import use_blocked_attention

            use_blocked_attention(module)
        elif variant == "+fused-qkv":
            module.fuse_qkv_projections()
        elif variant == "+1-thread":
            torch.set_num_threads(1)
        elif variant == "+channels-last":
            module.to(memory_format=torch.channels_last)
        xb, cb, zb = x.bfloat16(), ctx.bfloat16(), z.bfloat16()
        if variant in ("+channels-last", "+cl+packed"):
            xb = xb.contiguous(memory_format=torch.channels_last)
        call = (lambda: module(xb, t, encoder_hidden_states=cb)) if what == "unet" else (lambda: module.decode(zb))
    with torch.inference_mode():
        call()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _run_child(what: str, variant: str, repeat: int) -> float:
    done = subprocess.run([sys.executable, __file__, "--child", what, variant, "--repeat", str(repeat)],
                          capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} {variant} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--what", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--variants", nargs="+", help="only these (diffusers-bf16, the reference, is always run)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.repeat)))
        return
    if not (MODEL / "model_index.json").is_file():
        raise SystemExit(f"{MODEL} is missing: run `python bench/speed.py --model sd15 --configs editsuite` once")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD 1.5 architecture, bf16, 512x512; "
          f"{args.rounds} rounds, each child the median of {args.repeat} calls after a warm-up", flush=True)
    for what in args.what:
        for n in args.load:
            stop = mp.Event()
            loads = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
            for p in loads:
                p.start()
            times: dict[str, list[float]] = {k: [] for k in VARIANTS[what] if k == "diffusers-bf16"
                                             or args.variants is None or k in args.variants}
            try:
                for r in range(args.rounds):
                    for name in times:
                        times[name].append(_run_child(what, name, args.repeat))
                        print(f"  {what} load {n} round {r + 1} {name} {times[name][-1]:.3f}", flush=True)
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
