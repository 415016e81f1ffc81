"""The four shared modules as traceable torch modules with Apple's names and layouts (build time).

The inputs and outputs are those of Apple's converter (ml-stable-diffusion), so that Apple's pipelines
and the apps built on them run editsuite's packages:
- `TextEncoder`: input_ids (1, 77) float32 -> last_hidden_state (1, 77, D), pooled_outputs (1, D)
- `TextEncoderXL` (SDXL, `TextEncoder` and `TextEncoder2`): input_ids -> hidden_embeds (the penultimate
  layer, what SDXL's UNet reads), pooled_outputs (the first encoder's pooled output; the second's projected one)
- `Unet`: sample (2, C_in, h, w), timestep (2,), encoder_hidden_states (2, D, 1, 77) [, time_ids (2, 6 or 5)
  and text_embeds (2, P) for SDXL] [, class_labels (2,) int32 for the x4 upscaler, which Apple's tools do not
  run] -> noise_pred (2, 4, h, w). Built on the ANE rewrites; optionally one of two chunks.
- `VAEEncoder`: x (1, 3, H, W) in [-1, 1] -> latent (1, 8, h, w): mean and log-variance
- `VAEDecoder`: z (1, 4, h, w), unscaled latents -> image (1, 3, H, W)

The UNet's forward is written out here as three stages (embed + down + mid, up, out) instead of calling
diffusers' forward: the chunked UNet must stop between up blocks and hand the remaining skip connections
to the second chunk, which diffusers' single forward cannot do. Every stage calls diffusers' own blocks.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel

from editsuite.convert.ane import rewrite_unet


class GroupNorm4D(nn.Module):
    """GroupNorm that never leaves rank 4: (B, C, H, W) -> (B, G, C/G, H*W), statistics over the last two
    axes. torch's group_norm converts to rank-5 tensors, which the Neural Engine handles badly; the same
    `weight`/`bias` keys load unchanged."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]  # (B, C, H, W), or (B, C, S) in the VAE's attention
        g = x.reshape(b, self.groups, c // self.groups, -1)
        mean = g.mean(dim=(2, 3), keepdim=True)
        centred = g - mean
        var = (centred * centred).mean(dim=(2, 3), keepdim=True)
        g = centred * torch.rsqrt(var + self.eps)
        affine = (1, c) + (1,) * (x.ndim - 2)
        return g.reshape(x.shape) * self.weight.view(affine) + self.bias.view(affine)


def rank4_group_norms(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, GroupNorm4D(child))
        else:
            rank4_group_norms(child)
    return module


class TextEncoder(nn.Module):
    """Token ids come as float32, Apple's convention (its pipelines pass them so); the pooled output is
    CLIP's, taken at the end-of-text token."""

    inputs = ("input_ids",)
    outputs = ("last_hidden_state", "pooled_outputs")

    def __init__(self, text_encoder):
        super().__init__()
        self.model = text_encoder

    def forward(self, input_ids):
        hidden, pooled = self.model(input_ids.long(), return_dict=False)[:2]
        return hidden, pooled


class TextEncoderXL(TextEncoder):
    """SDXL's text encoders as Apple's converter gives them (`--xl-version`): the penultimate hidden states,
    and the pooled output (for the second encoder, `CLIPTextModelWithProjection`, the projected one)."""

    outputs = ("hidden_embeds", "pooled_outputs")

    def forward(self, input_ids):
        out = self.model(input_ids.long(), output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2], pooled


class VAEEncoder(nn.Module):
    inputs = ("x",)
    outputs = ("latent",)

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = rank4_group_norms(copy.deepcopy(vae.encoder)), vae.quant_conv

    def forward(self, x):
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)


class VAEDecoder(nn.Module):
    inputs = ("z",)
    outputs = ("image",)

    def __init__(self, vae):
        super().__init__()
        self.decoder, self.post_quant_conv = rank4_group_norms(copy.deepcopy(vae.decoder)), vae.post_quant_conv

    def forward(self, z):
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))


def _has_cross(block) -> bool:
    return getattr(block, "has_cross_attention", False)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def chunk_split(unet: UNet2DConditionModel) -> int:
    """Index of the first up block of the second chunk: the split with the weights closest to half."""
    total = _params(unet)
    first = total - sum(_params(b) for b in unet.up_blocks) - _params(unet.conv_out) - _params(unet.conv_norm_out)
    best, best_gap = 1, float("inf")
    for k in range(1, len(unet.up_blocks)):
        part = first + sum(_params(b) for b in unet.up_blocks[:k])
        if abs(2 * part - total) < best_gap:
            best, best_gap = k, abs(2 * part - total)
    return best


class Unet(nn.Module):
    """The ANE-rewritten UNet, whole (`part=None`) or one of two chunks (`part=1|2`, split at `split`).

    Chunk 1 returns the hidden state after up block `split - 1`, the time embedding and the skip
    connections chunk 2 still needs (`res_0`, `res_1`, ...); chunk 2 takes those and finishes."""

    def __init__(self, unet: UNet2DConditionModel, attention: str = "split-einsum", part: int | None = None,
                 split: int | None = None):
        super().__init__()
        self.unet = rank4_group_norms(rewrite_unet(unet, attention))
        self.part = part
        self.split = chunk_split(unet) if split is None else split
        self.class_labels = unet.config.num_class_embeds is not None or unet.config.class_embed_type is not None
        self.xl = unet.config.addition_embed_type == "text_time"
        n_res = 1 + sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in unet.down_blocks)
        self.n_left = n_res - sum(len(b.resnets) for b in unet.up_blocks[: self.split])
        head = ["sample", "timestep", "encoder_hidden_states"] + (["time_ids", "text_embeds"] if self.xl else []) \
            + (["class_labels"] if self.class_labels else [])
        left = [f"res_{i}" for i in range(self.n_left)]
        if part is None:
            self.inputs, self.outputs = tuple(head), ("noise_pred",)
        elif part == 1:
            self.inputs, self.outputs = tuple(head), ("hidden_states", "temb", *left)
        else:
            self.inputs, self.outputs = ("hidden_states", "temb", "encoder_hidden_states", *left), ("noise_pred",)

    def _embed(self, sample, timestep, class_labels, added=None):
        """The time (and class, or SDXL's size and pooled text) embedding at rank 4, (B, C, 1, 1), as the
        rewritten resnets take it: one reshape here instead of one per resnet."""
        u = self.unet
        emb = u.time_embedding(u.time_proj(timestep).to(sample.dtype)[:, :, None, None])
        if added is not None:  # SDXL, as diffusers' get_aug_embed: [text_embeds, sinusoids of time_ids]
            time_ids, text_embeds = added
            sizes = u.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + u.add_embedding(torch.cat([text_embeds, sizes], dim=-1).to(sample.dtype)[:, :, None, None])
        if u.class_embedding is not None:
            if u.config.class_embed_type == "timestep":
                labels = u.class_embedding(u.time_proj(class_labels).to(sample.dtype)[:, :, None, None])
            else:
                labels = u.class_embedding(class_labels.long()).to(sample.dtype)[:, :, None, None]
            emb = emb + labels
        return emb

    def _up(self, x, emb, ctx, res, blocks):
        for block in blocks:
            n = len(block.resnets)
            skip, res = res[-n:], res[:-n]
            if _has_cross(block):
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=skip, encoder_hidden_states=ctx)
            else:
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=skip)
        return x, res

    def _head(self, sample, timestep, ctx, class_labels, added=None):
        u = self.unet
        emb = self._embed(sample, timestep, class_labels, added)
        x = u.conv_in(sample)
        res = (x,)
        for block in u.down_blocks:
            if _has_cross(block):
                x, r = block(hidden_states=x, temb=emb, encoder_hidden_states=ctx)
            else:
                x, r = block(hidden_states=x, temb=emb)
            res += r
        x = u.mid_block(x, emb, encoder_hidden_states=ctx)
        return x, emb, res

    def _tail(self, x):
        u = self.unet
        if u.conv_norm_out is not None:
            x = u.conv_act(u.conv_norm_out(x))
        return u.conv_out(x)

    def forward(self, *args):
        u = self.unet
        if self.part == 2:
            x, emb, ctx, *res = args
            x, _ = self._up(x, emb, ctx, tuple(res), u.up_blocks[self.split:])
            return self._tail(x)
        sample, timestep, ctx = args[:3]
        added = tuple(args[3:5]) if self.xl else None
        x, emb, res = self._head(sample, timestep, ctx, args[-1] if self.class_labels else None, added)
        if self.part == 1:
            x, res = self._up(x, emb, ctx, res, u.up_blocks[: self.split])
            return (x, emb, *res)
        x, _ = self._up(x, emb, ctx, res, u.up_blocks)
        return self._tail(x)
