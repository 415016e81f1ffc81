"""Test helper: write diffusers components out in the ORIGINAL Stable Diffusion (LDM) checkpoint layout.

The inverse of diffusers' single-file conversion (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), written from the layout of the CompVis /
Stability checkpoints:

    model.diffusion_model.*           UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*               VAE (encoder.down.N.block.M, decoder.up.N reversed, 1x1-conv attention)
    cond_stage_model.transformer.*    SD 1.x text encoder (transformers CLIPTextModel, `text_model.` level)
    cond_stage_model.model.*          SD 2.x text encoder (OpenCLIP: resblocks, fused in_proj, 24 layers of
                                      which SD uses 23, plus an unused text_projection)
    conditioner.embedders.0.transformer.*  SDXL's first text encoder (transformers CLIPTextModel)
    conditioner.embedders.1.model.*   SDXL's second (OpenCLIP bigG, every layer, text_projection used)
    model.diffusion_model.label_emb.0.{0,2}.*  SDXL's added-conditioning MLP (diffusers' add_embedding)

Works on tensors of any device, including `meta` (to check key layouts at full size without allocating).
"""

from __future__ import annotations

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
XL_CLIP = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP = "conditioner.embedders.1.model."

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _resnet_sub(sub: str) -> str:
    head, _, rest = sub.partition(".")
    for new, old in _RESNET:
        if head == new:
            return f"{old}.{rest}"
    raise KeyError(f"unknown UNet resnet key {sub}")


def unet_to_ldm(state_dict: dict, config) -> dict:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` keys."""
    per_block = config["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    simple = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for key, value in state_dict.items():
        parts = key.split(".")
        head2 = ".".join(parts[:2])
        if parts[0] in simple or head2 in simple:
            prefix = head2 if head2 in simple else parts[0]
            new = simple[prefix] + key[len(prefix):]
        elif parts[0] == "down_blocks":
            b, kind, i = int(parts[1]), parts[2], int(parts[3])
            sub = ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * (per_block + 1) + i}.0.{_resnet_sub(sub)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * (per_block + 1) + i}.1.{sub}"
            elif kind == "downsamplers":  # downsamplers.0.conv.* -> op.*
                new = f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op.{sub.removeprefix('conv.')}"
            else:
                raise KeyError(key)
        elif parts[0] == "mid_block":
            kind, i = parts[1], int(parts[2])
            sub = ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * i}.{_resnet_sub(sub)}"
            else:
                new = f"middle_block.1.{sub}"
        elif parts[0] == "up_blocks":
            b, kind, i = int(parts[1]), parts[2], int(parts[3])
            sub = ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{b * (per_block + 1) + i}.0.{_resnet_sub(sub)}"
            elif kind == "attentions":
                new = f"output_blocks.{b * (per_block + 1) + i}.1.{sub}"
            elif kind == "upsamplers":  # after the last resnet (and its attention, if any)
                slot = 2 if up_has_attn[b] else 1
                new = f"output_blocks.{b * (per_block + 1) + per_block}.{slot}.{sub}"
            else:
                raise KeyError(key)
        else:
            raise KeyError(f"unhandled UNet key {key}")
        out[UNET + new] = value
    assert len(out) == len(state_dict)
    return out


def _vae_attn_sub(sub: str, value):
    names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for new, old in names.items():
        if sub.startswith(new + "."):
            sub = old + sub[len(new):]
            break
    else:
        raise KeyError(sub)
    if sub.endswith("weight") and value.ndim == 2:  # LDM attention projections are 1x1 convolutions
        value = value[:, :, None, None]
    return sub, value


def vae_to_ldm(state_dict: dict, config) -> dict:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*` keys."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = key
        else:
            side = parts[0]  # encoder / decoder
            rest = parts[1:]
            if rest[0] in ("conv_in", "conv_out"):
                new = key
            elif rest[0] == "conv_norm_out":
                new = f"{side}.norm_out.{'.'.join(rest[1:])}"
            elif rest[0] == "mid_block":
                kind, i, sub = rest[1], int(rest[2]), ".".join(rest[3:])
                if kind == "resnets":
                    new = f"{side}.mid.block_{i + 1}.{sub.replace('conv_shortcut', 'nin_shortcut')}"
                else:
                    sub, value = _vae_attn_sub(sub, value)
                    new = f"{side}.mid.attn_1.{sub}"
            elif rest[0] in ("down_blocks", "up_blocks"):
                b, kind, sub = int(rest[1]), rest[2], ".".join(rest[3:])
                level, name = (b, "down") if rest[0] == "down_blocks" else (n_up - 1 - b, "up")
                if kind == "resnets":
                    i, sub = sub.split(".", 1)
                    new = f"{side}.{name}.{level}.block.{i}.{sub.replace('conv_shortcut', 'nin_shortcut')}"
                elif kind == "downsamplers":
                    new = f"{side}.down.{level}.downsample.{sub.removeprefix('0.')}"
                elif kind == "upsamplers":
                    new = f"{side}.up.{level}.upsample.{sub.removeprefix('0.')}"
                else:
                    raise KeyError(key)
            else:
                raise KeyError(f"unhandled VAE key {key}")
        out[VAE + new] = value
    assert len(out) == len(state_dict)
    return out


def _flat_clip(state_dict: dict) -> dict:
    """CLIPTextModel keys without the `text_model.` level (transformers >= 5.6 layout), no buffers."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def clip_to_ldm(state_dict: dict) -> dict:
    """SD 1.x: transformers CLIPTextModel state dict -> `cond_stage_model.transformer.text_model.*` keys."""
    return {f"{CLIP}text_model.{k}": v for k, v in _flat_clip(state_dict).items()}


def open_clip_to_ldm(state_dict: dict, *, extra_layer: bool = True, projection_dim: int | None = None,
                     prefix: str = OPEN_CLIP) -> dict:
    """SD 2.x: CLIPTextModel state dict -> OpenCLIP `cond_stage_model.model.*` keys.

    Like real SD 2.x files, adds (when `extra_layer`) one more resblock than the text encoder config has
    (SD 2 conditions on OpenCLIP's penultimate layer) and the unused `text_projection`; both must be ignored.
    A CLIPTextModelWithProjection's own projection (SDXL) is written as OpenCLIP's `text_projection`, the
    transposed Linear weight.
    """
    pre = prefix
    sd = _flat_clip(state_dict)
    projection = sd.pop("text_projection.weight", None)
    out = {
        pre + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        pre + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        pre + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        pre + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    width = out[pre + "token_embedding.weight"].shape[-1]
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    names = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for i in layers:
        src = f"encoder.layers.{i}."
        dst = f"{pre}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0
            )
            for new, old in names.items():
                out[f"{dst}{old}.{kind}"] = sd.pop(f"{src}{new}.{kind}")
    assert not sd, f"unconverted text encoder keys: {sorted(sd)[:5]}"
    if projection is not None:
        out[pre + "text_projection"] = projection.t()
    if extra_layer:
        gen = torch.Generator().manual_seed(1)
        ref = out[pre + "token_embedding.weight"]

        def fresh(shape):
            if ref.is_meta:
                return torch.empty(shape, dtype=ref.dtype, device="meta")
            return torch.randn(shape, generator=gen).to(ref.dtype)

        last = layers[-1]
        for k in [k for k in out if k.startswith(f"{pre}transformer.resblocks.{last}.")]:
            out[k.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = fresh(out[k].shape)
        out[pre + "text_projection"] = fresh((width, projection_dim or width))
    return out


def to_ldm_xl_checkpoint(unet, vae, text_encoder, text_encoder_2) -> dict:
    """Full original-layout SDXL base state dict, as Stability's sd_xl_base_1.0.safetensors lays it out."""
    sd = {}
    sd.update(unet_to_ldm(unet.state_dict(), unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    sd.update({f"{XL_CLIP}text_model.{k}": v for k, v in _flat_clip(text_encoder.state_dict()).items()})
    sd.update(open_clip_to_ldm(text_encoder_2.state_dict(), extra_layer=False, prefix=XL_OPEN_CLIP))
    sd[XL_OPEN_CLIP + "logit_scale"] = torch.tensor(4.6052)  # in real files; unused
    return {k: (v.contiguous() if not v.is_meta else v) for k, v in sd.items()}


def to_ldm_checkpoint(unet, vae, text_encoder, *, open_clip: bool = False, extras: bool = True) -> dict:
    """Full original-layout state dict for (unet, vae, text_encoder) diffusers/transformers modules."""
    sd = {}
    sd.update(unet_to_ldm(unet.state_dict(), unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    te = text_encoder.state_dict()
    sd.update(open_clip_to_ldm(te) if open_clip else clip_to_ldm(te))
    if extras:  # what real LDM training checkpoints also carry; a loader must ignore it
        sd["betas"] = torch.linspace(0.00085, 0.012, 1000)
        sd["alphas_cumprod"] = torch.cumprod(1 - sd["betas"], 0)
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
        if open_clip:
            sd[OPEN_CLIP + "logit_scale"] = torch.tensor(4.6052)
    return {k: (v.contiguous() if not v.is_meta else v) for k, v in sd.items()}
