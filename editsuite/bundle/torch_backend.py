"""PyTorch backend: the four shared modules behind one small interface.

Every backend (this one, Core ML) offers the same four calls on torch tensors, so the shared loop never
knows which one runs:

- `encode_text(ids)`: token ids (B, 77) -> hidden states (B, 77, D)
- `unet(sample, t, context, class_labels)`: (B, C_in, h, w) -> prediction (B, 4, h, w)
- `vae_encode(image)`: pixels (B, 3, H, W) in [-1, 1] -> moments (B, 2*4, h, w) (mean, logvar)
- `vae_decode(latents)`: unscaled latents (B, 4, h, w) -> pixels (B, 3, H, W) in about [-1, 1]
"""

from __future__ import annotations

import torch

from editsuite.bundle import speed

# Decode (encode) pictures above this many pixels tile by tile with diffusers' tiled VAE: a 2048x2048 decode
# in one piece needs tens of GB; in tiles it stays under 4 GB. Below it, one piece, as diffusers does.
TILE_ABOVE_PIXELS = 1024 * 1024


def _place(module, device, dtype):
    """Eval mode, no grads, on `device` in `dtype` (cast only when needed: diffusers warns on any cast)."""
    module = module.to(device)
    if module.dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


class TorchBackend:
    """The four calls on PyTorch modules. Tensors cross this interface in float32 (latents, scheduler and
    guidance arithmetic stay exact); the modules compute in `compute_dtype` (bf16 / fp16 when fast)."""

    name = "torch"
    dtype = torch.float32

    def __init__(self, text_encoder, unet, vae, *, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.compute_dtype = self.vae_dtype = dtype
        self.text_encoder, self.unet_model, self.vae = (_place(m, self.device, dtype) for m in (text_encoder, unet, vae))
        self.notice: str | None = None  # set when the VAE had to fall back to float32
        if self.device.type == "cpu" and dtype == torch.bfloat16:  # the fast CPU default (bench/speed.py)
            speed.keep_freed_memory()
            speed.use_blocked_attention(self.unet_model)
            speed.use_blocked_attention(self.vae)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.device), attention_mask=None)[0].float()

    @torch.inference_mode()
    def unet(self, sample, timestep, context, class_labels=None) -> torch.Tensor:
        dt = self.compute_dtype
        return self.unet_model(
            sample.to(dt), timestep, encoder_hidden_states=context.to(dt), class_labels=class_labels, return_dict=False
        )[0].float()

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
        out = run(x.to(self.device, self.vae_dtype), tiled)
        if self.vae_dtype != torch.float32 and not torch.isfinite(out).all():
            self.vae = self.vae.to(torch.float32)
            self.vae_dtype = torch.float32
            self.notice = "the VAE overflowed in float16; it runs in float32 from now on (slower, same picture)"
            out = run(x.to(self.device, torch.float32), tiled)
        return out.float()


def _tile_pixels(vae) -> int:
    size = vae.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) ** 2
