"""The fast PyTorch default: the dtype auto picks, bf16 weights with a float32 loop, the fp16 VAE guard and
tiled VAE for large pictures. (Timing lives in bench/speed.py and bench/pieces.py, not here.)"""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from tiny import save_tiny, tiny_components

import editsuite
from editsuite import load_bundle
from editsuite.bundle import speed, torch_backend
from editsuite.bundle.loader import resolve_dtype
from editsuite.bundle.torch_backend import TorchBackend


def test_auto_dtype():
    expect = torch.bfloat16 if speed.cpu_has_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expect
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("kind", ["base", "inpainting", "upscaler"])
def test_packed_weights_give_the_same_numbers(kind):
    """Convolution weights laid out for oneDNN once give the unpacked UNet's output up to the rounding of the
    dtype (oneDNN's bias add rounds once where aten's rounds twice: within one bf16 step), for NCHW and NHWC
    samples; packed bf16 Linear weights then change nothing at all."""
    for dtype in (torch.bfloat16, torch.float32):
        unet = tiny_components(kind)["unet"].to(dtype).eval()
        cfg = unet.config
        g = torch.Generator().manual_seed(6)
        x = torch.randn(2, cfg.in_channels, 8, 8, generator=g).to(dtype)
        ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(dtype)
        labels = torch.tensor([20, 20]) if kind == "upscaler" else None
        nhwc = x.contiguous(memory_format=torch.channels_last)
        run = lambda sample: unet(sample, 10, encoder_hidden_states=ctx, class_labels=labels).sample  # noqa: E731
        with torch.inference_mode():
            expect = run(x)
            convs = sum(type(m) is torch.nn.Conv2d for m in unet.modules())
            assert speed.pack_convolutions(unet) == convs > 0
            assert not any(type(m) is torch.nn.Conv2d for m in unet.modules())
            tolerance = float(expect.abs().max()) * (2 ** -6 if dtype == torch.bfloat16 else 1e-5)
            for sample in (x, nhwc):
                assert (run(sample) - expect).abs().max() <= tolerance
            packed = run(nhwc)
            linears = sum(type(m) is torch.nn.Linear for m in unet.modules())
            assert speed.pack_linears(unet) == (linears if dtype == torch.bfloat16 else 0)
            if dtype == torch.bfloat16:
                assert linears > 0 and not any(type(m) is torch.nn.Linear for m in unet.modules())
            assert torch.equal(run(nhwc), packed)


def test_low_precision_bundle_keeps_the_loop_in_float32(tmp_path):
    folder = save_tiny(tmp_path / "m")
    fast, exact = load_bundle(folder, device="cpu", dtype="bfloat16"), load_bundle(folder, device="cpu", dtype="float32")
    assert (fast.dtype, fast.compute_dtype) == (torch.float32, torch.bfloat16)
    assert next(fast.backend.unet_model.parameters()).dtype == torch.bfloat16
    # diffusers' own SDPA processor (the blocked attention of old lost to it, bench/pieces.py)
    assert isinstance(fast.backend.unet_model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor,
                      AttnProcessor2_0)
    assert isinstance(fast.backend.unet_model.conv_in, speed.PackedConv2d)  # weights laid out once
    assert isinstance(fast.backend.unet_model.time_embedding.linear_1, speed.PackedLinear)
    assert fast.backend.channels_last and not exact.backend.channels_last
    assert isinstance(exact.backend.unet_model.conv_in, torch.nn.Conv2d)  # float32: diffusers' modules as they are
    x = torch.randn(2, 4, 8, 8)
    assert fast.backend.unet(x, torch.tensor(10), torch.randn(2, 77, 32)).dtype == torch.float32
    a = editsuite.Txt2Img(fast).run("a red circle", steps=4, width=64, height=64, seed=3)
    b = editsuite.Txt2Img(exact).run("a red circle", steps=4, width=64, height=64, seed=3)
    assert a.metadata["dtype"] == "bfloat16" and b.metadata["dtype"] == "float32"
    diff = np.abs(np.asarray(a.images[0], dtype=float) - np.asarray(b.images[0], dtype=float))
    assert diff.mean() < 4  # same picture up to bf16 rounding (levels of 255)


def _fp16_backend(scale: float) -> TorchBackend:
    c = tiny_components()
    backend = TorchBackend(c["text_encoder"], c["unet"], c["vae"], device=torch.device("cpu"), dtype=torch.float16)
    with torch.no_grad():
        backend.vae.decoder.conv_out.weight.mul_(scale)  # pushes the decoder's output past fp16's 65504
        backend.vae.decoder.conv_out.bias.mul_(scale)
    return backend


def test_fp16_vae_overflow_falls_back_to_float32():
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    backend = _fp16_backend(1e6)
    with torch.no_grad():
        expect = backend.vae.float().decode(z).sample
    backend.vae.half()
    out = backend.vae_decode(z)
    assert torch.isfinite(out).all() and out.abs().max() > 65504  # it really did overflow in fp16
    assert backend.vae_dtype == torch.float32 and "float32" in backend.notice
    torch.testing.assert_close(out, expect)
    again = _fp16_backend(1.0)  # a VAE that does not overflow stays in fp16, without a notice
    assert torch.isfinite(again.vae_decode(z)).all() and again.vae_dtype == torch.float16 and again.notice is None


def test_large_pictures_go_through_the_tiled_vae(monkeypatch):
    c = tiny_components()
    backend = TorchBackend(c["text_encoder"], c["unet"], c["vae"], device=torch.device("cpu"), dtype=torch.float32)
    tiled = []
    for name in ("tiled_decode", "_tiled_encode"):
        real = getattr(backend.vae, name)
        monkeypatch.setattr(backend.vae, name, lambda *a, _real=real, _n=name, **k: tiled.append(_n) or _real(*a, **k))
    g = torch.Generator().manual_seed(3)
    small, big = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 24, 24, generator=g)
    backend.vae_decode(small)
    backend.vae_encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert tiled == []  # at or below the threshold: one piece, as diffusers does
    monkeypatch.setattr(torch_backend, "TILE_ABOVE_PIXELS", 64 * 64)
    pixels = backend.vae_decode(big)
    moments = backend.vae_encode(pixels.clamp(-1, 1))
    assert tiled == ["tiled_decode", "_tiled_encode"]
    assert pixels.shape == (1, 3, 192, 192) and moments.shape == (1, 8, 24, 24)
    assert torch.isfinite(pixels).all() and torch.isfinite(moments).all()


@pytest.mark.parametrize("kind,prediction", [("base", "epsilon"), ("base", "v_prediction"), ("upscaler", "epsilon"),
                                              ("inpainting", "epsilon")])
def test_outer_level_on_the_kept_feature_equals_the_whole_unet(kind, prediction):
    """Reusing the deep feature of the very same inputs must give the whole UNet's output: this checks that
    the outer-level path embeds, skips and finishes exactly as UNet2DConditionModel.forward does."""
    c = tiny_components(kind, prediction)
    backend = TorchBackend(c["text_encoder"], c["unet"], c["vae"], device=torch.device("cpu"), dtype=torch.float32)
    cfg = backend.unet_model.config
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    labels = torch.tensor([20, 20]) if kind == "upscaler" else None
    t = torch.tensor(321)
    whole = backend.unet(x, t, ctx, class_labels=labels)
    cache = backend.feature_cache()
    torch.testing.assert_close(backend.unet(x, t, ctx, class_labels=labels, cache=cache), whole)  # full step
    assert cache.feature is not None
    cache.reuse = True
    torch.testing.assert_close(backend.unet(x, t, ctx, class_labels=labels, cache=cache), whole, atol=1e-5, rtol=1e-4)
    other = backend.unet(x, torch.tensor(900), ctx, class_labels=labels, cache=cache)  # a stale feature: differs
    assert not torch.allclose(other, backend.unet(x, torch.tensor(900), ctx, class_labels=labels), atol=1e-4)


def test_cache_interval_in_a_task(tmp_path, monkeypatch):
    bundle = load_bundle(save_tiny(tmp_path / "m"), device="cpu", dtype="float32")
    plain = editsuite.Txt2Img(bundle).run("a red circle", steps=6, width=64, height=64, seed=5)
    outer = []
    real = TorchBackend._outer_level
    monkeypatch.setattr(TorchBackend, "_outer_level", lambda self, *a: outer.append(1) or real(self, *a))
    bundle.cache_interval = 3
    cached = editsuite.Txt2Img(bundle).run("a red circle", steps=6, width=64, height=64, seed=5)
    assert len(outer) == 4  # steps 1, 2, 4, 5 reuse; 0 and 3 run the whole UNet
    assert cached.metadata["cache_interval"] == 3 and "cache_interval" not in plain.metadata
    a, b = (np.asarray(r.images[0], dtype=float) for r in (plain, cached))
    assert 0 < np.abs(a - b).mean() < 40  # a different picture, not a broken one


def _spin(stop):
    x = 0
    while not stop.is_set():
        x += 1


def test_thread_governor_follows_what_other_processes_take(monkeypatch):
    """Scripted /proc/stat samples (1 s apart, 100 ticks a second, 2 cores): another process busy on one core
    leaves one thread, an idle machine all of them; never more than torch started with, never fewer than 1."""
    g = speed.ThreadGovernor()
    g.cores, g.tick, g.most = 2, 100, 2
    samples = iter([(1.0, 180, 0.8), (2.0, 290, 1.8), (3.0, 400, 2.6)])  # (time, busy ticks, own CPU s)
    monkeypatch.setattr(speed.ThreadGovernor, "_sample", staticmethod(lambda: next(samples)))
    g.last = (0.0, 0, 0.0)
    assert g.threads() == 1  # 1.8 CPU-s of busy ticks, 0.8 ours: another process held one core
    assert g.threads() == 2  # 1.1 CPU-s busy, 1.0 ours: the others took 0.1 of a core
    g.most = 1
    assert g.threads() == 1 and torch.get_num_threads() == 1  # idle again (1.1 busy, 0.8 ours), but capped


def test_thread_governor_sees_a_real_busy_process(monkeypatch):
    """With a process spinning on one core, the governor runs one thread fewer than the machine has cores
    (at least one); once it stops, all of them again."""
    import multiprocessing as mp
    import time

    if speed.ThreadGovernor._sample() is None:
        pytest.skip("no /proc/stat here")
    g = speed.ThreadGovernor()
    g.most = g.cores
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        time.sleep(0.5)
        g.last = g._sample()
        time.sleep(1.0)
        assert g.threads() == max(1, g.cores - 1)
    finally:
        stop.set()
        spinner.join()
    time.sleep(0.2)
    g.last = g._sample()
    time.sleep(1.0)
    assert g.threads() == g.cores


def test_thread_governor_runs_in_the_fast_default_unless_pinned(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "m")
    fast, exact = load_bundle(folder, device="cpu", dtype="bfloat16"), load_bundle(folder, device="cpu", dtype="float32")
    assert exact.backend.governor is None  # float32 (parity) keeps torch's own threads
    assert (fast.backend.governor is not None) == (speed.ThreadGovernor._sample() is not None)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert load_bundle(folder, device="cpu", dtype="bfloat16").backend.governor is None
