"""editsuite's blocked attention, the PyTorch backend's attention on bf16 CPUs until issue 20, kept here
for the benchmarks that compare it (bench/pieces.py, attention_load.py, unet_load.py): warm and interleaved,
diffusers' SDPA processor is faster both idle and with a core shared, so the package no longer uses it.

Plain matmuls over one head and a block of queries at a time, the block's scores kept in cache.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

# Below this many keys diffusers' SDPA processor is as fast (cross-attention has 77).
MIN_BLOCKED_KEYS = 1024
# Scores of one block of queries: 2**21 entries (4 MiB in bf16, 8 in fp32) keep the block in L2/L3.
BLOCK_SCORES = 1 << 21


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
