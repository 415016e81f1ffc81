"""The demo family's model definitions: a small VAE (factor 4), a small CLIP text encoder, the UNets of the
base, the inpainting model and the x4 upscaler, each built from diffusers' and transformers' own classes.
Used by the training stages (train.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER = Path(__file__).resolve().parent.parent / "configs" / "sd-v1" / "tokenizer"
RES = 64  # native resolution of base and inpainting models
FACTOR = 4  # VAE downsampling: a small object (15 px at 64 px) spans 4 latent pixels, not 2 as at factor 8
LAT = RES // FACTOR
TRAIN_SEED = 7
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
UP_BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)


def make_vae(blocks: tuple[int, ...] = (16, 32, 64)) -> AutoencoderKL:
    n = len(blocks)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=blocks, layers_per_block=1,
                         latent_channels=4, norm_num_groups=16, sample_size=RES)


def tokenize(tok: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def make_text_encoder(hidden: int = 32, layers: int = 3) -> CLIPTextModel:
    """CLIP text model over the full CLIP vocabulary; the token table dominates its size (49408 x hidden)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=max(1, hidden // 16),
        num_hidden_layers=layers, max_position_embeddings=77, projection_dim=hidden, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu"))


def make_upscaler_text_encoder() -> CLIPTextModel:
    """The upscaler is trained without prompts (its context is always that of ""), so its text encoder is a
    minimal, seeded one: it keeps the pipeline's shape and the family's size small."""
    torch.manual_seed(TRAIN_SEED)
    return make_text_encoder(hidden=8, layers=1)


def make_unet(in_channels: int, *, upscaler: bool = False) -> UNet2DConditionModel:
    if upscaler:
        # Convolutions only (no attention, not even in the mid block): the prompt is always "", and a
        # convolutional UNet does the same work at any picture size. (The 7 dB an earlier upscaler lost at
        # 32 -> 128 px was its VAE's decode of whole 128 px pictures; see `upvae`.)
        return UNet2DConditionModel(
            sample_size=LAT, in_channels=in_channels, out_channels=4, block_out_channels=(64, 96),
            layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D", cross_attention_dim=8,
            norm_num_groups=16, num_class_embeds=1000)
    return UNet2DConditionModel(
        sample_size=LAT, in_channels=in_channels, out_channels=4, block_out_channels=(64, 96),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4,  # diffusers' name for the number of heads: 4 heads of 24, 1.5x faster than 8 of 12
        norm_num_groups=16)
