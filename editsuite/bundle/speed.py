"""What makes the PyTorch backend fast on a CPU, each piece measured by `bench/speed.py` (bench/RESULTS.md).

- `fast_dtype`: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), float16 on GPUs,
  float32 elsewhere. bf16 has fp32's range, so nothing overflows on a CPU; fp16 can (see the VAE guard in
  torch_backend).
- `BlockedAttention`: an attention processor for long self-attention on CPUs. PyTorch's CPU flash-attention
  kernel runs SD's 4096-token, 40-wide heads at about a third of the machine's bf16 matmul speed; plain
  matmuls over one head and a block of queries at a time, with the block's scores kept in cache, are
  25-45 % faster there (and equal on short or cross-attention, where it hands over to diffusers' own
  processor). diffusers has no such processor for CPUs; it is written here for that reason.
- `keep_freed_memory`: glibc returns every large freed block to the kernel, so each UNet step pays about
  140 000 page faults (0.5 GB zeroed by the kernel) to get it back; keeping freed memory for reuse saves
  about 5 % of a step. The kept memory is handed back before the VAE runs (`release_freed_memory`), and
  tiled VAE work runs with glibc's plain behaviour (`plain_malloc`), so neither raises the peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

# Below this many keys diffusers' SDPA processor is as fast (cross-attention has 77).
MIN_BLOCKED_KEYS = 1024
# Scores of one block of queries: 2**21 entries (4 MiB in bf16, 8 in fp32) keep the block in L2/L3.
BLOCK_SCORES = 1 << 21


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_dtype(device: torch.device) -> torch.dtype:
    """`--dtype auto`: bf16 on CPUs that have it, fp16 on GPUs, fp32 otherwise."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float16


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
                      scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, in blocks of queries. (B, S, H*D) x (B, Skv, H*D) -> (B, S, H*D).

    Heads stay interleaved in the channel axis as the projections wrote them (strided views, no copies)."""
    batch, length, channels = query.shape
    dim = channels // heads
    block = max(64, BLOCK_SCORES // key.shape[1])
    out = torch.empty_like(query)
    query = query * scale
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * dim, (h + 1) * dim)
            keys_t, values_t = key[b, :, cols].t(), value[b, :, cols].t().contiguous()
            for start in range(0, length, block):
                weights = torch.softmax(torch.mm(query[b, start:start + block, cols], keys_t), dim=-1)
                # (v^T w^T)^T: oneDNN runs a 40-row product faster than a 40-column one (measured 28 %)
                out[b, start:start + block, cols] = torch.mm(values_t, weights.t()).t()
    return out


class BlockedAttention(AttnProcessor2_0):
    """diffusers' SDPA processor, but long self-attention without a mask runs `blocked_attention`."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or attn.norm_q is not None or attn.norm_k is not None or hidden_states.device.type != "cpu"
                or _tokens(hidden_states) < MIN_BLOCKED_KEYS):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = blocked_attention(attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states),
                                attn.heads, attn.scale)
        out = attn.to_out[1](attn.to_out[0](out))
        if image:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _tokens(hidden_states: torch.Tensor) -> int:
    return hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]


def use_blocked_attention(module: torch.nn.Module) -> None:
    """Give every diffusers `Attention` inside `module` the blocked processor."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(BlockedAttention())


_libc = None  # set once keep_freed_memory has tuned glibc


def keep_freed_memory() -> None:
    """Ask glibc to serve every block from its heap and keep freed memory there for reuse, instead of
    mapping and unmapping each large block (Linux with glibc only; a no-op elsewhere). Process-wide, so done
    once, by the PyTorch backend on a CPU. `release_freed_memory` hands the kept memory back."""
    global _libc
    if _libc is not None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        if _set_malloc(libc, KEEP):
            _libc = libc
    except (OSError, AttributeError):  # musl or another libc
        return


# glibc mallopt settings (from malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3, M_MMAP_MAX -4).
KEEP = {-4: 0, -1: 1 << 31, -3: 1 << 30}  # every block from the heap, up to 2 GiB of freed memory kept
PLAIN = {-4: 65536, -1: 128 << 10, -3: 128 << 10}  # glibc's defaults (without their dynamic threshold)


def _set_malloc(libc, settings: dict) -> bool:
    return all(libc.mallopt(k, v) for k, v in settings.items())


@contextlib.contextmanager
def plain_malloc():
    """glibc's own behaviour for a while: for tiled VAE work over large pictures, whose many tiles would
    otherwise leave a kept heap of odd-sized holes (measured: 4.6 GiB for a 2048x2048 decode and encode
    with an SD 1.5 model loaded)."""
    if _libc is None:
        yield
        return
    _libc.malloc_trim(0)
    _set_malloc(_libc, PLAIN)
    try:
        yield
    finally:
        _libc.malloc_trim(0)
        _set_malloc(_libc, KEEP)


def release_freed_memory() -> None:
    """Return the freed memory glibc kept (malloc_trim) before work with other sizes, the VAE's large
    activations after the UNet's steps: kept blocks of the wrong sizes would only add to the peak
    (measured 3.6 instead of 3.2 GiB for a 512x512 txt2img)."""
    if _libc is not None:
        _libc.malloc_trim(0)
