"""Tiny seeded Stable Diffusion components built from configs (no weights can be downloaded here).

Same architectures as the real models, scaled down: a 4-block VAE (factor 8, like SD), a 2-block UNet with
cross-attention, a 2-layer CLIP text encoder over the real CLIP vocabulary. Native resolution 64x64.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "editsuite" / "configs" / "sd-v1" / "tokenizer"


def tiny_components(kind: str = "base", prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """kind: base (4-ch UNet), inpainting (9-ch), upscaler (7-ch with class labels, VAE factor 4).
    prediction_type "v_prediction" also switches the UNet to SD2's linear projections and per-block heads."""
    torch.manual_seed(seed)
    v2 = prediction_type == "v_prediction"
    upscaler = kind == "upscaler"
    in_ch = {"base": 4, "inpainting": 9, "upscaler": 7}[kind]
    unet = UNet2DConditionModel(
        sample_size=16 if upscaler else 8,
        in_channels=in_ch,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if v2 else 8,
        use_linear_projection=v2,
        norm_num_groups=32,
        num_class_embeds=400 if upscaler else None,
    )
    torch.manual_seed(seed + 1)
    vae_blocks = 3 if upscaler else 4
    vae = AutoencoderKL(
        block_out_channels=[32] * vae_blocks,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * vae_blocks,
        up_block_types=["UpDecoderBlock2D"] * vae_blocks,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.08333 if upscaler else 0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu" if v2 else "quick_gelu", projection_dim=32,
    ))
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, prediction_type=prediction_type)
    if upscaler:
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                  clip_sample=False, set_alpha_to_one=False)
        return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                    low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear"))
    scheduler = DDIMScheduler(**sched_kw) if v2 else PNDMScheduler(
        skip_prk_steps=True, steps_offset=1, **{k: v for k, v in sched_kw.items() if k in
                                                 ("beta_start", "beta_end", "beta_schedule", "prediction_type")})
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tiny_bundle(kind: str = "base", prediction_type: str = "epsilon", seed: int = 0, components: dict | None = None):
    from editsuite import ModelBundle

    comps = components or tiny_components(kind, prediction_type, seed)
    return ModelBundle.from_components(**comps, name=f"tiny-{kind}")


def save_tiny(folder: Path, kind: str = "base", prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder (model_index.json and subfolders)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline

    comps = tiny_components(kind, prediction_type, seed)
    if kind == "upscaler":
        pipe = StableDiffusionUpscalePipeline(**comps, max_noise_level=350)
    else:
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_xl_components(prediction_type: str = "epsilon", seed: int = 0, in_channels: int = 4) -> dict:
    """A tiny SDXL: two text encoders (CLIP-L-like and a projecting OpenCLIP-like one, whose tokenizer pads
    with "!"), a UNet (`in_channels` 9: SDXL inpainting) with SDXL's "text_time" added conditioning,
    transformer depth (1, 2) and linear projections, a factor-8 VAE with SDXL's latent scale, Euler with
    SDXL's "leading" spacing."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=[32] * 4, in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )
    text = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
                layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                max_position_embeddings=77, projection_dim=32)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text, hidden_act="quick_gelu"))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
                tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER, pad_token="!"), scheduler=scheduler)


def save_tiny_xl(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """The tiny SDXL as a diffusers folder (StableDiffusionXLPipeline's layout)."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**tiny_xl_components(prediction_type, seed), add_watermarker=False).save_pretrained(
        folder, safe_serialization=True)
    return folder


def tiny_xl_refiner_components(base: dict, seed: int = 11) -> dict:
    """A tiny SDXL refiner for the tiny SDXL `base`: its own UNet (conditioned on the second text encoder
    alone, 32 wide, and on an aesthetic score instead of a target size: 5 time ids), the base's second text
    encoder, VAE and scheduler config, as SDXL's refiner shares them; no first text encoder."""
    from diffusers import EulerDiscreteScheduler

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=72,
        cross_attention_dim=32, norm_num_groups=32,
    )
    return dict(unet=unet, vae=base["vae"], text_encoder=None, tokenizer=None,
                text_encoder_2=base["text_encoder_2"], tokenizer_2=base["tokenizer_2"],
                scheduler=EulerDiscreteScheduler.from_config(base["scheduler"].config))
