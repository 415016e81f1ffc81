"""ANE rewrites of the UNet: same outputs as the original at fp32 (PSNR >= 60 dB), no Linear left,
the original state dict loads unchanged."""

import pytest
import torch
from tiny import tiny_components

from editsuite.convert.ane import AttentionVariant, attention_original, attention_split_einsum, count_linears, rewrite_unet


def psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    mse = torch.mean((ref.double() - x.double()) ** 2)
    peak = ref.double().abs().max()
    return float(10 * torch.log10(peak**2 / mse.clamp_min(1e-30)))


CONFIGS = {
    "sd1-like": ("base", "epsilon"),
    "sd2-like": ("base", "v_prediction"),  # linear projections, per-block head counts
    "9-channel": ("inpainting", "epsilon"),
    "7-channel": ("upscaler", "epsilon"),  # class labels
}


@pytest.mark.parametrize("variant", list(AttentionVariant))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_rewritten_unet_matches_original(config, variant, monkeypatch):
    import editsuite.convert.ane as ane

    monkeypatch.setattr(ane, "V2_MAX_WEIGHTS", 1024)  # so v2 really chunks the tiny model's 64-token attention
    kind, pred = CONFIGS[config]
    unet = tiny_components(kind, pred)["unet"].eval()
    rewritten = rewrite_unet(unet, variant)
    assert count_linears(rewritten) == 0 and count_linears(unet) > 0
    torch.manual_seed(0)
    c = unet.config
    side = c.sample_size
    sample = torch.randn(2, c.in_channels, side, side)
    ctx = torch.randn(2, 77, c.cross_attention_dim)
    labels = torch.tensor([20, 20]) if c.num_class_embeds else None
    with torch.no_grad():
        ref = unet(sample, 500, ctx, class_labels=labels).sample
        out = rewritten(sample, 500, ctx, class_labels=labels).sample
    assert psnr(ref, out) >= 60, psnr(ref, out)


def test_split_einsum_equals_batched_attention():
    torch.manual_seed(1)
    q = torch.randn(2, 16, 1, 50)
    for keys in (7, 50):  # cross-attention (77 keys in SD) and self-attention, which v2 chunks
        k, v = torch.randn(2, 16, 1, keys), torch.randn(2, 16, 1, keys)
        ref = attention_original(q, k, v, 4, 0.5)
        assert torch.allclose(attention_split_einsum(q, k, v, 4, 0.5), ref, atol=1e-5)
        assert torch.allclose(attention_split_einsum(q, k, v, 4, 0.5, max_weights=16 * keys), ref, atol=1e-5)


def test_original_checkpoint_loads_unchanged():
    unet = tiny_components("base")["unet"]
    rewritten = rewrite_unet(unet)
    state = unet.state_dict()
    rewritten.load_state_dict(state)  # 2-D Linear weights go into 1x1 kernels through the pre-hooks
    w = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert state[w].ndim == 2 and rewritten.state_dict()[w].shape == (*state[w].shape, 1, 1)


def test_rewrite_shares_the_weights_instead_of_copying_them():
    """Converting a 3.4 GB UNet must not hold its weights twice: the rewritten UNet takes the original's tensors."""
    unet = tiny_components("base")["unet"]
    rewritten = rewrite_unet(unet)
    for name in ("conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight"):
        assert rewritten.state_dict()[name].data_ptr() == unet.state_dict()[name].data_ptr(), name
