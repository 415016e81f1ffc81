"""Apple Neural Engine rewrites of the diffusers UNet, written here (build time only).

What changes, following the published Core ML Stable Diffusion approach:
- inside every transformer the activations keep the (B, C, 1, S) layout: channels on dim 1, the
  sequence on the last axis, never more than rank 4;
- every Linear becomes a 1x1 convolution (q/k/v/out, GEGLU, feed-forward, linear projections, the time
  embedding and the resnets' time projections);
- LayerNorm normalises over channels (dim 1) for that layout;
- attention is `original` (batched matmuls, for GPUs), `split-einsum` (one einsum pair per head) or
  `split-einsum-v2` (also in chunks of queries).
The original checkpoint loads unchanged: a load-state-dict pre-hook gives each converted Linear weight
(out, in) its 1x1 kernel shape (out, in, 1, 1). GroupNorm and the convolutions stay as they are.
"""

from __future__ import annotations

import enum
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel


class AttentionVariant(str, enum.Enum):
    ORIGINAL = "original"
    SPLIT_EINSUM = "split-einsum"
    SPLIT_EINSUM_V2 = "split-einsum-v2"


QUERY_CHUNK = 512  # split-einsum-v2: queries per chunk


def _linear_weight_to_kernel(state_dict, prefix, *args):
    """Pre-hook: a Linear's (out, in) weight becomes the (out, in, 1, 1) kernel of its 1x1 convolution."""
    key = prefix + "weight"
    if key in state_dict and state_dict[key].ndim == 2:
        state_dict[key] = state_dict[key][:, :, None, None]


class Conv1x1(nn.Conv2d):
    """A Linear as a 1x1 convolution over (B, C, 1, S) or (B, C, H, W)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
        with torch.no_grad():
            self.weight.copy_(linear.weight[:, :, None, None])
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self._register_load_state_dict_pre_hook(_linear_weight_to_kernel)


class VectorConv1x1(Conv1x1):
    """A Linear on vectors (B, C) as a 1x1 convolution: (B, C) -> (B, C, 1, 1) -> conv -> (B, C')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, None, None])[:, :, 0, 0]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, 1, S); the same `weight` and `bias` (C,) as nn.LayerNorm."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)  # (B, 1, 1, S)
        centred = x - mean
        var = (centred * centred).mean(dim=1, keepdim=True)
        out = centred * torch.rsqrt(var + self.eps)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


# -- attention in the (B, C, 1, S) layout ----------------------------------------------------------------

def attention_original(q, k, v, heads: int, scale: float) -> torch.Tensor:
    """q (B, C, 1, Sq), k/v (B, C, 1, Sk) -> (B, C, 1, Sq), all heads in one batched matmul."""
    b, c, _, sq = q.shape
    d = c // heads
    q = q.view(b, heads, d, sq)  # (B, h, d, Sq)
    k = k.view(b, heads, d, -1)
    v = v.view(b, heads, d, -1)
    w = torch.einsum("bhdq,bhdk->bhqk", q, k) * scale  # (B, h, Sq, Sk)
    w = w.softmax(dim=-1)
    out = torch.einsum("bhqk,bhdk->bhdq", w, v)  # (B, h, d, Sq)
    return out.reshape(b, c, 1, sq)


def attention_split_einsum(q, k, v, heads: int, scale: float, chunk: int | None = None) -> torch.Tensor:
    """Per head: weights (B, Sk, 1, Sq) = einsum(q_h, k_h) * scale, softmax over the keys (dim 1), then
    einsum with v_h; heads concatenated on channels. With `chunk`, queries go `chunk` at a time (v2)."""
    d = q.shape[1] // heads
    kt = k.transpose(1, 3)  # (B, Sk, 1, C)
    outs = []
    for h in range(heads):
        qh = q[:, h * d:(h + 1) * d]  # (B, d, 1, Sq)
        kh = kt[:, :, :, h * d:(h + 1) * d]  # (B, Sk, 1, d)
        vh = v[:, h * d:(h + 1) * d]  # (B, d, 1, Sk)
        pieces = [qh] if chunk is None or qh.shape[3] <= chunk else list(qh.split(chunk, dim=3))
        parts = []
        for qc in pieces:
            w = torch.einsum("bchq,bkhc->bkhq", qc, kh) * scale  # (B, Sk, 1, Sq')
            w = w.softmax(dim=1)
            parts.append(torch.einsum("bkhq,bchk->bchq", w, vh))  # (B, d, 1, Sq')
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=3))
    return torch.cat(outs, dim=1)


def _attend(attn, x, ctx, variant: AttentionVariant) -> torch.Tensor:
    """diffusers Attention (q/k/v/out already 1x1 convs) on x (B, C, 1, S); ctx (B, D, 1, 77) or None."""
    src = x if ctx is None else ctx
    q, k, v = attn.to_q(x), attn.to_k(src), attn.to_v(src)
    if variant is AttentionVariant.ORIGINAL:
        out = attention_original(q, k, v, attn.heads, attn.scale)
    else:
        chunk = QUERY_CHUNK if variant is AttentionVariant.SPLIT_EINSUM_V2 else None
        out = attention_split_einsum(q, k, v, attn.heads, attn.scale, chunk)
    return attn.to_out[0](out)


def _feed_forward(ff, x) -> torch.Tensor:
    act = ff.net[0]
    h = act.proj(x)
    if isinstance(act, GEGLU):
        h, gate = h.chunk(2, dim=1)
        h = h * F.gelu(gate)
    else:  # GELU (tanh or exact)
        h = F.gelu(h, approximate=getattr(act, "approximate", "none"))
    return ff.net[2](h)


def _block_forward(self, x, ctx, variant):
    """BasicTransformerBlock (SD's layer_norm type) in the (B, C, 1, S) layout."""
    x = _attend(self.attn1, self.norm1(x), ctx if self.only_cross_attention else None, variant) + x
    if self.attn2 is not None:
        x = _attend(self.attn2, self.norm2(x), ctx, variant) + x
    return _feed_forward(self.ff, self.norm3(x)) + x


def _transformer_forward(self, hidden_states, encoder_hidden_states=None, *args, return_dict: bool = True,
                         **kwargs):
    """Transformer2DModel (continuous input): (B, C, H, W) -> same, through (B, C, 1, H*W)."""
    b, _, h, w = hidden_states.shape
    x = self.proj_in(self.norm(hidden_states))  # a 1x1 conv, whether the model used conv or linear projection
    x = x.reshape(b, x.shape[1], 1, h * w)  # (B, C, 1, S)
    ctx = encoder_hidden_states
    if ctx is not None and ctx.ndim == 3:  # diffusers' (B, 77, D); the converted UNet takes (B, D, 1, 77) as is
        ctx = ctx.transpose(1, 2).unsqueeze(2)
    for block in self.transformer_blocks:
        x = _block_forward(block, x, ctx, self._ane_variant)
    out = self.proj_out(x.reshape(b, -1, h, w)) + hidden_states
    if not return_dict:
        return (out,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=out)


def _swap_linears(module: nn.Module, vector: bool) -> None:
    """Linears -> 1x1 convs (on vectors when `vector`); inside transformers also LayerNorm -> channel-wise."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, (VectorConv1x1 if vector else Conv1x1)(child))
        elif isinstance(child, nn.LayerNorm) and not vector:
            setattr(module, name, ChannelLayerNorm(child))
        else:
            _swap_linears(child, vector)


def rewrite_unet(unet: UNet2DConditionModel, attention: str | AttentionVariant = AttentionVariant.SPLIT_EINSUM,
                 ) -> UNet2DConditionModel:
    """A new UNet with the ANE rewrites, built from `unet`'s config; its original state dict loads into it
    unchanged. Inputs and outputs are as the original's: sample (B, C, H, W), timestep, context (B, 77, D), or
    the context in Apple's layout (B, D, 1, 77), which the converted UNet takes."""
    variant = AttentionVariant(attention)
    ane = UNet2DConditionModel.from_config(unet.config)
    for module in ane.modules():
        if isinstance(module, Transformer2DModel):
            if not (module.is_input_continuous and all(isinstance(b, BasicTransformerBlock)
                                                       for b in module.transformer_blocks)):
                raise ValueError("only continuous-input transformers with basic blocks can be rewritten")
            module._ane_variant = variant
            module.forward = types.MethodType(_transformer_forward, module)
            _swap_linears(module, vector=False)
    # the remaining Linears work on vectors: time embedding and the resnets' time projections
    _swap_linears(ane, vector=True)
    ane.load_state_dict(unet.state_dict())
    return (ane if ane.dtype == unet.dtype else ane.to(unet.dtype)).eval()


def count_linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())
