"""How the demo family is fitted: the VAE and diffusion training loops (min-SNR weighting, offset noise, EMA,
warm-up and cosine learning rates) and the latent helpers. `DEVICE` is where the models train (train.py's
--device sets it); data and random numbers stay on the CPU."""

from __future__ import annotations

import copy
import math
import time

import torch
from diffusers import AutoencoderKL

from editsuite.demo.data import to_tensor

MIN_SNR = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023): faster convergence for the same steps
# Offset noise (Guttenberg 2023): a per-picture, per-channel constant added to the training noise. SD's schedule
# leaves a trace of the picture's mean at t=999; at 16x16 latents the model learns to read the background's
# colour from that trace instead of the caption, and sampling from pure noise then gives muddy backgrounds.
OFFSET_NOISE = 0.1
DEVICE = torch.device("cpu")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class EMA:
    def __init__(self, model, decay: float = 0.999):
        self.decay, self.shadow = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.shadow.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train_vae(vae: AutoencoderKL, steps: int, batch: int, make_batch, name: str, lr: float = 1e-3,
              decoder_only: bool = False, made=None, bf16: bool = False) -> AutoencoderKL:
    """decoder_only: the encoder (and so the latent space a UNet was trained on) stays as it is.
    made(n) -> (pictures, unscaled latents a UNet made for them): with it, 3 steps in 4 decode those.
    bf16: encode and decode under bfloat16 autocast (weights, optimiser and loss stay float32), as in
    `train_unet`. Measured on this CPU (AMX), 8 pictures of 128 px: the family VAE's round trip 0.38 s a step
    instead of 0.65, the decoder alone 0.28 instead of 0.48."""
    vae.to(DEVICE)
    vae.train().requires_grad_(not decoder_only)
    if decoder_only:
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            if made is not None and step % 4:
                x, z = (v.to(DEVICE) for v in made(batch))
                kl = torch.zeros(())
            else:
                x = make_batch(batch).to(DEVICE)
                with torch.set_grad_enabled(not decoder_only):
                    post = vae.encode(x).latent_dist
                z, kl = post.sample(), post.kl().float().mean()
            y = vae.decode(z).sample.float()
        loss = (y - x).abs().mean() + (y - x).pow(2).mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return vae.cpu().eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images, chunk: int = 256) -> torch.Tensor:
    """uint8 pictures (N, H, W, 3) or pixels (N, 3, H, W) in [-1, 1] -> VAE moments (N, 8, h, w)."""
    def pixels(i):
        part = images[i:i + chunk]
        return (part if isinstance(part, torch.Tensor) else to_tensor(part)).to(DEVICE)

    vae.to(DEVICE)
    out = torch.cat([vae.encode(pixels(i)).latent_dist.parameters.cpu() for i in range(0, len(images), chunk)])
    vae.cpu()
    return out


def sample_latents(moments: torch.Tensor, scale: float) -> torch.Tensor:
    mean, logvar = moments.chunk(2, dim=1)
    return (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * scale


def train_unet(unet, text_encoder, *, steps: int, batch: int, make_batch, sched, name: str, lr: float,
               train_text: bool, offset: float = 0.0, mask_weight: float = 0.0, bf16: bool = False,
               fused: bool = False, checkpoint=None) -> tuple:
    """Diffusion training: make_batch(n) -> (x0 latents, ids, extra channels or None, class labels or None).
    mask_weight: for inpainting (extra channel 0 = the mask), the loss inside the mask counts 1 + mask_weight
    times as much as outside. bf16: forward and backward under bfloat16 autocast (weights, optimiser and loss
    stay float32); it pays on a CPU with AVX512-BF16 for the convolutional upscaler (measured in `upscaler`).
    fused: PyTorch's fused AdamW kernel, the same update in one pass (the upscaler's optimiser step: 10 ms -> 2 ms
    on this CPU); the base and inpainting keep the default loop, so their shipped weights reproduce as trained."""
    unet.to(DEVICE)
    text_encoder.to(DEVICE)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=fused or None)
    ema_u = EMA(unet)
    ema_t = EMA(text_encoder) if train_text else None
    text_encoder.train(train_text).requires_grad_(train_text)
    unet.train()
    acp = sched.alphas_cumprod.to(DEVICE)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x0, ids, extra, labels = (v if v is None else v.to(DEVICE) for v in make_batch(batch))
        noise = torch.randn(x0.shape)  # drawn on the CPU: the same numbers whatever --device is
        if offset:
            noise = noise + offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1)
        noise = noise.to(DEVICE)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],)).to(DEVICE)
        xt = sched.add_noise(x0, noise, t)
        if sched.config.prediction_type == "v_prediction":
            a = acp[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
            target = a * noise - s * x0
        else:
            target = noise
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.set_grad_enabled(train_text):
                ctx = text_encoder(ids)[0]
            inp = xt if extra is None else torch.cat([xt, extra], dim=1)
            pred = unet(inp, t, ctx, class_labels=labels).sample.float()
        snr = acp[t] / (1 - acp[t])
        weight = snr.clamp(max=MIN_SNR) / (snr + 1 if sched.config.prediction_type == "v_prediction" else snr)
        err = (pred - target).pow(2)
        if mask_weight:
            err = err * (1 + mask_weight * extra[:, :1])
        loss = (weight * err.mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_u.update(unet, step)
        if ema_t:
            ema_t.update(text_encoder, step)
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        if checkpoint is not None and step % 1000 == 999:  # so a long run can be looked at midway
            checkpoint(ema_u.shadow, ema_t.shadow if ema_t else text_encoder)
    return ema_u.shadow, (ema_t.shadow if ema_t else text_encoder.eval())
