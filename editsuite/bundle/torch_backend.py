"""PyTorch backend: the four shared modules behind one small interface.

Every backend (this one, Core ML) offers the same four calls on torch tensors, so the shared loop never
knows which one runs:

- `encode_text(ids)`: token ids (B, 77) -> hidden states (B, 77, D)
- `encode_text_xl(ids, ids_2)` (SDXL): both encoders -> hidden states (B, 77, D1+D2) and pooled (B, P)
- `unet(sample, t, context, class_labels, added)`: (B, C_in, h, w) -> prediction (B, 4, h, w); SDXL's
  `added` holds its "text_embeds" (B, P) and "time_ids" (B, 6)
- `vae_encode(image)`: pixels (B, 3, H, W) in [-1, 1] -> moments (B, 2*4, h, w) (mean, logvar)
- `vae_decode(latents)`: unscaled latents (B, 4, h, w) -> pixels (B, 3, H, W) in about [-1, 1]
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from editsuite.bundle import speed
from editsuite.bundle.backend import ModelBackend
from editsuite.errors import UserError

# Decode (encode) pictures above this many pixels tile by tile with diffusers' tiled VAE: a 2048x2048 decode
# in one piece needs tens of GB; in tiles it stays under 4 GB. Below it, one piece, as diffusers does.
TILE_ABOVE_PIXELS = 1024 * 1024
# VAE work on pictures of this many pixels or more runs with glibc's own malloc: kept freed memory would add
# to its large activations (measured, SDXL's VAE decoding 1024x1024 in bf16: 2.5 GiB above the loaded model
# with the kept heap, 1.55 GiB without)
PLAIN_MALLOC_PIXELS = 1024 * 1024


def _place(module, device, dtype):
    """Eval mode, no grads, on `device` in `dtype` (cast only when needed: diffusers warns on any cast).
    A module left empty (`load_bundle(modules=...)`, weights on the meta device) stays as it is."""
    if any(p.is_meta for p in module.parameters()):
        return module.eval().requires_grad_(False)
    module = module.to(device)
    if module.dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


class TorchBackend(ModelBackend):
    """The four calls on PyTorch modules. Tensors cross this interface in float32 (latents, scheduler and
    guidance arithmetic stay exact); the modules compute in `compute_dtype` (bf16 / fp16 when fast)."""

    name = "torch"
    dtype = torch.float32

    def __init__(self, text_encoder, unet, vae, *, device: torch.device, dtype: torch.dtype, text_encoder_2=None):
        self.device = torch.device(device)
        self.compute_dtype = self.vae_dtype = dtype
        # text_encoder is None for SDXL's refiner, text_encoder_2 for everything but SDXL
        self.text_encoder, self.unet_model, self.vae, self.text_encoder_2 = (
            None if m is None else _place(m, self.device, dtype) for m in (text_encoder, unet, vae, text_encoder_2))
        self.notice: str | None = None  # set when the VAE had to fall back to float32
        # SDXL loaded from disk: reads both text encoders again (see `encode_text_xl`)
        self.reload_text_encoders: Callable[[], tuple] | None = None
        self.governor = None  # the fast default's thread count that follows the machine's load
        self.channels_last = False  # the fast default hands the UNet NHWC samples (bench/pieces.py)
        if self.device.type == "cpu" and dtype == torch.bfloat16:  # the fast CPU default (bench/pieces.py)
            self.governor = speed.ThreadGovernor.unless_pinned()
            speed.keep_freed_memory()
            speed.pack_convolutions(self.unet_model)
            speed.pack_linears(self.unet_model)
            self.channels_last = True
            # oneDNN's bf16 convolutions take NHWC as it is; NCHW is copied to a blocked layout and back at
            # every conv, which at 512x512 costs the VAE decode time and ~0.15 GiB of peak memory
            self.vae.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.device), attention_mask=None)[0].float()

    @torch.inference_mode()
    def encode_text_xl(self, input_ids: torch.Tensor | None,
                       input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: both encoders' penultimate hidden states side by side (the refiner: the second's alone), and
        the second one's pooled, projected embedding, as diffusers' StableDiffusionXLPipeline.encode_prompt
        takes them."""
        if self.text_encoder_2 is None:  # let go after the last prompt: read again
            try:
                reloaded = self.reload_text_encoders()
            except UserError:
                raise
            except Exception as e:  # the model's files moved or changed since it was loaded
                raise UserError(f"SDXL's text encoders could not be read again from the model's files "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); load the model "
                                "again") from None
            self.text_encoder, self.text_encoder_2 = (
                None if m is None else _place(m, self.device, self.compute_dtype) for m in reloaded)
        second = self.text_encoder_2(input_ids_2.to(self.device), output_hidden_states=True)
        hidden = second.hidden_states[-2]
        if self.text_encoder is not None:
            first = self.text_encoder(input_ids.to(self.device), output_hidden_states=True)
            hidden = torch.cat([first.hidden_states[-2], hidden], dim=-1)
        return hidden.float(), second.text_embeds.float()

    def release_text_encoders(self) -> None:
        """SDXL's text encoders (1.5 GiB in bf16) are idle while the UNet and VAE work, and a 1024x1024
        picture's VAE decode needs about that much: they are let go when the UNet starts and read again, in a
        few seconds, for the next new prompt (the prompt cache spares repeated ones). With them kept, a
        1024x1024 txt2img peaks above 8 GiB (bench/sdxl.py)."""
        import gc

        self.text_encoder = self.text_encoder_2 = None
        gc.collect()
        speed.release_freed_memory()

    @torch.inference_mode()
    def unet(self, sample, timestep, context, class_labels=None, cache: "FeatureCache | None" = None,
             added: dict | None = None) -> torch.Tensor:
        dt = self.compute_dtype
        if self.reload_text_encoders is not None and self.text_encoder_2 is not None:
            self.release_text_encoders()
        if self.governor is not None:
            self.governor.threads()
        sample, context = sample.to(dt), context.to(dt)
        if self.channels_last:  # the packed convolutions take NHWC as it is (see speed.PackedConv2d)
            sample = sample.contiguous(memory_format=torch.channels_last)
        extra = {} if added is None else {"added_cond_kwargs": {k: v.to(self.device, dt) for k, v in added.items()}}
        if cache is not None and cache.reuse and cache.feature is not None:
            return self._outer_level(sample, timestep, context, class_labels, cache.feature).float().contiguous()
        hook = None
        if cache is not None:
            hook = self.unet_model.up_blocks[-2].register_forward_hook(lambda mod, args, out: cache.keep(out))
        try:
            return self.unet_model(
                sample, timestep, encoder_hidden_states=context, class_labels=class_labels, return_dict=False, **extra
            )[0].float().contiguous()
        finally:
            if hook is not None:
                hook.remove()

    def feature_cache(self) -> "FeatureCache":
        u = self.unet_model
        if len(u.up_blocks) < 2 or u.config.addition_embed_type is not None or u.config.class_embeddings_concat:
            raise UserError("--cache-interval works on SD 1.x/2.x UNets only; leave it at 1 for this model")
        return FeatureCache()

    def _outer_level(self, sample, timestep, context, class_labels, deep):
        """The UNet's outermost level only: time embedding, conv_in, first down block, last up block (fed
        the deep feature kept from the last full step), conv_out. diffusers' own blocks and embedding
        helpers; the order is that of UNet2DConditionModel.forward."""
        u = self.unet_model
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep))
        class_emb = u.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = emb + class_emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        x = u.conv_in(sample)
        first, last = u.down_blocks[0], u.up_blocks[-1]
        cross = dict(encoder_hidden_states=context) if getattr(first, "has_cross_attention", False) else {}
        _, res = first(hidden_states=x, temb=emb, **cross)
        skips = ((x,) + tuple(res))[: len(last.resnets)]  # what the full forward hands the last up block
        cross = dict(encoder_hidden_states=context) if getattr(last, "has_cross_attention", False) else {}
        x = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, **cross)
        if u.conv_norm_out is not None:
            x = u.conv_act(u.conv_norm_out(x))
        return u.conv_out(x)

    @torch.inference_mode()
    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        return self._vae(self._encode, image, image.shape[-2] * image.shape[-1])

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self._vae(self._decode, latents, latents.shape[-2] * latents.shape[-1] * f * f)

    def _encode(self, image: torch.Tensor, tiled: bool) -> torch.Tensor:
        if tiled:
            return self.vae._tiled_encode(image)
        return self.vae.encode(image).latent_dist.parameters

    def _decode(self, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
        return (self.vae.tiled_decode if tiled else self.vae.decode)(latents, return_dict=False)[0]

    def _vae(self, run, x: torch.Tensor, pixels: int) -> torch.Tensor:
        """Run the VAE in its dtype; an fp16 VAE that overflows (SD's can) moves to float32 for good, with
        a notice, and the call is redone, so no black or NaN picture is ever returned."""
        tiled = pixels > TILE_ABOVE_PIXELS and pixels > _tile_pixels(self.vae)
        speed.release_freed_memory()
        if self.governor is not None:
            self.governor.threads()
        with speed.plain_malloc() if tiled or pixels >= PLAIN_MALLOC_PIXELS else contextlib.nullcontext():
            out = run(x.to(self.device, self.vae_dtype), tiled)
            if self.vae_dtype != torch.float32 and not torch.isfinite(out).all():
                low = str(self.vae_dtype).replace("torch.", "")
                self.vae = self.vae.to(torch.float32)
                self.vae_dtype = torch.float32
                self.notice = f"the VAE overflowed in {low}; it runs in float32 from now on (slower, same picture)"
                out = run(x.to(self.device, torch.float32), tiled)
        return out.float()


class FeatureCache:
    """`cache_interval` (DeepCache, Ma et al. 2023): full UNet steps keep the input of the last up block;
    the steps in between (`reuse` set by the loop) run only the outermost level on it. diffusers has no
    such mode for UNet2DConditionModel; it is built here from diffusers' own blocks."""

    def __init__(self):
        self.feature: torch.Tensor | None = None
        self.reuse = False

    def keep(self, out: torch.Tensor) -> None:
        self.feature = out


def _tile_pixels(vae) -> int:
    size = vae.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) ** 2
