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

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from editsuite.bundle.choices import Attention


AttentionVariant = Attention  # the layouts of attention a conversion can write (bundle/choices.py)


# split-einsum-v2: at most this many attention weights per head and chunk of queries, 4 MiB in fp16. At
# 512x512 in SD 1.5 that cuts the 4096-token self-attention into Apple's 512-query chunks and leaves the
# 1024-token one whole (2 MiB a head), as it leaves cross-attention (77 keys)
V2_MAX_WEIGHTS = 1 << 21


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
    """A Linear on vectors as a 1x1 convolution: (B, C) -> (B, C, 1, 1) -> conv -> (B, C'), or (B, C, 1, 1) ->
    (B, C', 1, 1) as it is (the converted UNet keeps its time embedding at rank 4: no reshapes per resnet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return super().forward(x)
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


def attention_split_einsum(q, k, v, heads: int, scale: float, max_weights: int | None = None) -> torch.Tensor:
    """Per head: weights (B, Sk, 1, Sq) = einsum(q_h, k_h), softmax over the keys (dim 1), then einsum with
    v_h; heads concatenated on channels. With `max_weights` (v2), queries go in chunks small enough that
    each head's weights hold at most that many values.

    Fewer ops than a slice per head: q, k and v are each cut into heads by one split, and q is scaled once
    (for SD 1.5 at 512x512, about 700 fewer ops in the UNet program than a slice per head; coremltools
    folds the scale into to_q's convolution)."""
    d = q.shape[1] // heads
    qs = (q * scale).split(d, dim=1)  # heads x (B, d, 1, Sq)
    ks = k.transpose(1, 3).split(d, dim=3)  # heads x (B, Sk, 1, d)
    vs = v.split(d, dim=1)  # heads x (B, d, 1, Sk)
    sq, sk = q.shape[3], k.shape[3]
    chunk = max(1, max_weights // sk) if max_weights is not None and sq * sk > max_weights else None
    outs = []
    for qh, kh, vh in zip(qs, ks, vs):
        parts = []
        for qc in qh.split(chunk, dim=3) if chunk else (qh,):
            w = torch.einsum("bchq,bkhc->bkhq", qc, kh).softmax(dim=1)  # (B, Sk, 1, Sq')
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
        limit = V2_MAX_WEIGHTS if variant is AttentionVariant.SPLIT_EINSUM_V2 else None
        out = attention_split_einsum(q, k, v, attn.heads, attn.scale, limit)
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


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """ResnetBlock2D (SD's: no up/down sampling, "default" time-embedding norm) taking the time embedding as
    diffusers gives it, (B, C), or as the converted UNet (`modules.Unet`) does, at rank 4: (B, C, 1, 1)."""
    h = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
    if self.time_emb_proj is not None and temb is not None:
        t = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
        h = h + (t if t.ndim == 4 else t[:, :, None, None])
    h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    out = input_tensor + h
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


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
    import accelerate

    variant = AttentionVariant(attention)
    with accelerate.init_empty_weights():  # no memory of its own: it takes `unet`'s tensors below
        ane = UNet2DConditionModel.from_config(unet.config)
        for module in ane.modules():
            if isinstance(module, Transformer2DModel):
                if not (module.is_input_continuous and all(isinstance(b, BasicTransformerBlock)
                                                           for b in module.transformer_blocks)):
                    raise ValueError("only continuous-input transformers with basic blocks can be rewritten")
                module._ane_variant = variant
                module.forward = types.MethodType(_transformer_forward, module)
                _swap_linears(module, vector=False)
            elif isinstance(module, ResnetBlock2D) and module.upsample is None and module.downsample is None \
                    and module.time_embedding_norm == "default":
                module.forward = types.MethodType(_resnet_forward, module)
        # the remaining Linears work on vectors: time embedding and the resnets' time projections
        _swap_linears(ane, vector=True)
    # the original's tensors, shared rather than copied (a Linear's weight enters its 1x1 kernel as a view):
    # converting SD 1.5's UNet holds one copy of its weights, not two
    ane.load_state_dict(unet.state_dict(), assign=True)
    return ane.eval()


def count_linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())
