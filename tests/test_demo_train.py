"""The demo family's training script, end to end at a tiny scale: every stage runs, the three folders it
exports load as their kinds and run their tasks. (Training quality is the scorer's business, not a test's.)"""

import pytest

import editsuite
from editsuite import ModelKind, load_bundle
from editsuite.demo import FOLDERS
from editsuite.demo.train import main as train


@pytest.mark.slow
def test_all_stages_at_a_tiny_scale(tmp_path):
    train(["--work", str(tmp_path / "work"), "--dest", str(tmp_path / "out"), "--scale", "0.002"])
    times = (tmp_path / "work" / "times-all.json").read_text()
    stages = ("vae", "vaetune", "base", "inpaint", "upvae", "upscaler", "updecoder", "export")
    assert all(stage in times for stage in stages)
    bundles = {kind: load_bundle(tmp_path / "out" / FOLDERS[kind], device="cpu") for kind in ModelKind}
    assert all(b.kind is kind for kind, b in bundles.items())
    assert bundles[ModelKind.BASE].manifest.native_resolution == 64
    out = editsuite.Txt2Img(bundles[ModelKind.BASE]).run("a red circle on a blue background", steps=2, seed=0)
    assert out.images[0].size == (64, 64)
    up = editsuite.Upscale(bundles[ModelKind.UPSCALER]).run(out.images[0].resize((16, 16)), steps=2, seed=0)
    assert up.images[0].size == (64, 64)


def test_decoder_only_tuning_keeps_the_latent_space():
    """The upscaler's decoder is tuned after its UNet learnt the latents: the encoder must not move."""
    import torch

    from editsuite.demo.fitting import train_vae
    from editsuite.demo.models import make_vae

    torch.manual_seed(0)
    vae = make_vae((16, 32))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    tuned = train_vae(vae, 2, 2, lambda b: torch.rand(b, 3, 16, 16) * 2 - 1, "test", lr=1e-2, decoder_only=True)
    after = tuned.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    moved = [k for k in decoder if not torch.equal(before[k], after[k])]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert moved


def test_bf16_training_runs_the_unet_in_bfloat16_and_keeps_float32_weights():
    """The upscaler trains under bfloat16 autocast: its convolutions must see bf16, its weights stay float32."""
    import torch
    from diffusers import DDPMScheduler

    from editsuite.demo.fitting import train_unet
    from editsuite.demo.models import UP_BETAS, make_unet, make_upscaler_text_encoder

    torch.manual_seed(0)
    unet, te = make_unet(7, upscaler=True), make_upscaler_text_encoder()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    seen = []
    unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def batch(b):
        return torch.randn(b, 4, 8, 8), torch.zeros(b, 77, dtype=torch.long), torch.randn(b, 3, 8, 8), \
            torch.randint(0, 350, (b,))

    ema, _ = train_unet(unet, te, steps=2, batch=2, make_batch=batch, name="test", lr=1e-3, train_text=False,
                        sched=DDPMScheduler(**UP_BETAS, prediction_type="v_prediction"), bf16=True)
    assert seen == [torch.bfloat16] * 2
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert any(not torch.equal(before[k], v) for k, v in ema.state_dict().items())
