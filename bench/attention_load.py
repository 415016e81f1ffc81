"""One SD 1.5 self-attention call (512x512: 4096 tokens, 320 channels, 8 heads, batch 2 for guidance), idle
and with N background processes keeping cores busy, for each way of computing it. Issue 20's first question:
which attention collapses when another process shares the cores?

    python bench/attention_load.py [--load 0 1] [--repeat 7] [--dtype bfloat16]

Variants (all give the same numbers to bf16 rounding; checked against SDPA first):
- blocked: editsuite's `blocked_attention` until issue 20 (per batch, head and block of queries: two small matmuls);
- heads-batched: the same blocks, all heads in one `bmm` per block of queries (8x fewer parallel regions);
- sdpa: torch's scaled_dot_product_attention on (B, H, S, D), as diffusers' default processor calls it.
Each condition runs the variants interleaved, `--repeat` rounds, and prints the median and the spread of each,
and the ratio against sdpa measured in the same condition. The load processes are started and stopped here.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F

from blocked_attention import BLOCK_SCORES, blocked_attention

B, S, C, H = 2, 4096, 320, 8


def heads_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    batch, length, channels = q.shape
    dim = channels // heads
    block = max(64, BLOCK_SCORES // k.shape[1])
    out = torch.empty_like(q)
    q = (q * scale).view(batch, length, heads, dim).transpose(1, 2)  # (B, H, S, D), a view
    kt = k.view(batch, -1, heads, dim).permute(0, 2, 3, 1).contiguous()  # (B, H, D, S)
    vv = v.view(batch, -1, heads, dim).transpose(1, 2).contiguous()  # (B, H, S, D)
    o = out.view(batch, length, heads, dim).transpose(1, 2)
    for b in range(batch):
        for start in range(0, length, block):
            w = torch.softmax(torch.bmm(q[b, :, start:start + block], kt[b]), dim=-1)
            o[b, :, start:start + block] = torch.bmm(w, vv[b])
    return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    batch, length, channels = q.shape
    split = lambda t: t.view(batch, -1, heads, channels // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    return out.transpose(1, 2).reshape(batch, length, channels)


VARIANTS = {"blocked": blocked_attention, "heads-batched": heads_batched, "sdpa": sdpa}


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def measure(n_load: int, repeat: int, dtype: torch.dtype) -> dict[str, list[float]]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, C).to(dtype) for _ in range(3))
    scale = (C // H) ** -0.5
    stop = mp.Event()
    loads = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n_load)]
    for p in loads:
        p.start()
    try:
        time.sleep(0.5 if n_load else 0)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        with torch.inference_mode():
            for name, fn in VARIANTS.items():  # warm-up, one each
                fn(q, k, v, H, scale)
            for _ in range(repeat):
                for name, fn in VARIANTS.items():
                    t0 = time.perf_counter()
                    fn(q, k, v, H, scale)
                    times[name].append(time.perf_counter() - t0)
    finally:
        stop.set()
        for p in loads:
            p.join()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, nargs="+", default=[0, 1], help="background busy processes, per condition")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, S, C).to(dtype) for _ in range(3))
    ref = sdpa(q, k, v, H, (C // H) ** -0.5).float()
    for name, fn in VARIANTS.items():
        err = (fn(q, k, v, H, (C // H) ** -0.5).float() - ref).abs().max().item()
        print(f"check {name}: max |diff| to sdpa {err:.4f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, B={B} S={S} C={C} H={H}")
    for n in args.load:
        times = measure(n, args.repeat, dtype)
        base = statistics.median(times["sdpa"])
        print(f"\nload {n} busy process(es): median s (min-max), ratio = sdpa time / this time")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:14s} {med:7.3f} ({min(ts):.3f}-{max(ts):.3f})  x{base / med:.2f}")


if __name__ == "__main__":
    main()
