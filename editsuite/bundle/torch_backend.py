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


def _place(module, device, dtype):
    """Eval mode, no grads, on `device` in `dtype` (cast only when needed: diffusers warns on any cast)."""
    module = module.to(device)
    if module.dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


class TorchBackend:
    name = "torch"

    def __init__(self, text_encoder, unet, vae, *, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_encoder, self.unet_model, self.vae = (_place(m, self.device, dtype) for m in (text_encoder, unet, vae))

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids.to(self.device), attention_mask=None)[0]
        return out.to(self.dtype)

    @torch.inference_mode()
    def unet(self, sample, timestep, context, class_labels=None) -> torch.Tensor:
        return self.unet_model(
            sample.to(self.dtype), timestep, encoder_hidden_states=context, class_labels=class_labels, return_dict=False
        )[0]

    @torch.inference_mode()
    def vae_encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image.to(self.device, self.dtype)).latent_dist.parameters

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype), return_dict=False)[0]
