"""Task behaviour beyond parity: strength 0, cancelling, seamless tiles, outpaint canvas, callbacks."""

import itertools
import re

import numpy as np
import PIL.Image
import pytest
from tiny import tiny_bundle

import editsuite
from editsuite.core.loop import Cancelled
from editsuite.tasks import upscale as upscale_mod
from editsuite.tasks.outpaint import extend_canvas
from editsuite.tasks.upscale import tile_starts, tile_weights


@pytest.fixture(scope="module")
def base():
    return tiny_bundle()


def test_img2img_strength_zero_returns_the_input(base, photo):
    out = editsuite.Img2Img(base).run(photo, "x", strength=0, seed=1).images[0]
    assert np.array_equal(np.asarray(out), np.asarray(photo))


def test_img2img_keeps_odd_input_size(base, photo):
    odd = photo.resize((61, 45))
    assert editsuite.Img2Img(base).run(odd, "x", steps=2, seed=1).images[0].size == (61, 45)


def test_callback_sees_every_step_and_can_cancel(base):
    seen = []
    editsuite.Txt2Img(base).run("x", steps=3, seed=1, scheduler="euler",
                                callback=lambda s: seen.append((s.index, s.total)))
    assert seen == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(Cancelled):
        editsuite.Txt2Img(base).run("x", steps=3, seed=1, callback=lambda s: False)


def test_metadata_records_every_setting(base):
    meta = editsuite.Txt2Img(base).run("a cat", negative_prompt="dog", steps=2, seed=3, scheduler="euler",
                                       guidance_scale=5).metadata
    assert {k: meta[k] for k in ("task", "prompt", "negative_prompt", "steps", "seed", "scheduler",
                                 "guidance_scale", "width", "height")} == dict(
        task="txt2img", prompt="a cat", negative_prompt="dog", steps=2, seed=3, scheduler="euler",
        guidance_scale=5, width=64, height=64)
    assert meta["sampler"] == "Euler" and meta["model"]["kind"] == "base"


def test_random_seed_is_recorded_and_reproduces(base):
    first = editsuite.Txt2Img(base).run("x", steps=2)
    again = editsuite.Txt2Img(base).run("x", steps=2, seed=first.metadata["seed"])
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


def test_tiles_cover_and_crossfade_exactly():
    assert tile_starts(100, 64, 16) == [0, 36]
    assert tile_starts(64, 64, 16) == [0]
    ramp = (np.arange(16) + 0.5) / 16
    left = tile_weights(1, 64, 16, (False, False, False, True))[0]  # a neighbour on the right only
    right = tile_weights(1, 64, 16, (False, False, True, False))[0]
    assert np.array_equal(left[-16:], ramp[::-1]) and (left[:-16] == 1).all()
    assert np.array_equal(right[:16], ramp) and (right[16:] == 1).all()
    # where two tiles overlap, the left one's share falls and the right one's rises: a crossfade, not an average
    acc, shares = np.zeros(100), []
    for x in tile_starts(100, 64, 16):
        w = tile_weights(1, 64, 16, (False, False, x > 0, x + 64 < 100))[0]
        acc[x:x + 64] += w
        shares.append(np.pad(w, (x, 100 - 64 - x)))
    assert (acc > 0).all()
    first = shares[0][36:64] / acc[36:64]
    assert first[0] > 0.95 and first[-1] < 0.05 and (np.diff(first) <= 0).all() and (np.diff(first) < 0).sum() >= 15


def test_tiled_upscale_blend_is_seamless(base, photo, monkeypatch):
    """With tiles that come back unchanged, the crossfade must give back the Lanczos picture exactly; with
    tiles of different flat greys, the picture must fade from one to the next without a seam."""
    monkeypatch.setattr(upscale_mod, "img2img_latents", lambda *a, **k: None)
    out = editsuite.Upscale(base).run(photo, scale=2.5, tile=64, overlap=24, strength=0.5, seed=1).images[0]
    expect = photo.resize((160, 160), PIL.Image.LANCZOS)
    assert np.abs(np.asarray(out, int) - np.asarray(expect, int)).max() <= 1

    tiles = itertools.count()  # 4 x 4 tiles, row by row: each column of tiles comes back one flat grey
    monkeypatch.setattr(upscale_mod, "img2img_latents", lambda *a, **k: "latents")
    monkeypatch.setattr(upscale_mod.loop, "decode",
                        lambda bundle, latents: [PIL.Image.new("RGB", (64, 64), (20 + 40 * (next(tiles) % 4),) * 3)])
    out = np.asarray(editsuite.Upscale(base).run(photo, scale=2.5, tile=64, overlap=24, strength=0.5,
                                                 seed=1).images[0], int)
    row = out[10, :, 0]  # across the first row of tiles: 20, 60, 100, 140, faded into each other
    assert row[0] == 20 and row[-1] == 140
    assert (np.diff(row) >= 0).all() and np.abs(np.diff(row)).max() <= 5  # an average's seam jumps by 20


def test_outpaint_canvas_and_masks(photo):
    canvas, mask, overlay = extend_canvas(photo, 8, 0, 0, 16, feather=4)
    assert canvas.size == (72, 80)
    m, o = np.asarray(mask), np.asarray(overlay)
    assert (m[:64, 8:] == 0).all() and (m[:, :8] == 255).all() and (m[64:] == 255).all()
    assert (o[:64, 8:] == 0).all() and o[0, 0] == 255 and 0 < o[10, 7] < 255
    assert np.array_equal(np.asarray(canvas)[:64, 8:], np.asarray(photo))


def test_outpaint_needs_a_side(base, photo):
    with pytest.raises(editsuite.UserError, match="nothing to extend"):
        editsuite.Outpaint(base).run(photo, "x")


def test_preview_from_a_step_callback(base):
    from editsuite.core.loop import preview

    shown = []
    editsuite.Txt2Img(base).run("x", steps=2, seed=1, scheduler="euler",
                                callback=lambda s: shown.append(preview(base, s.latents)[0].size))
    assert shown == [(64, 64), (64, 64)]


def test_a_size_over_the_limit_is_refused_by_the_python_api_too(base):
    with pytest.raises(editsuite.UserError, match="width must be at most 16384 pixels"):
        editsuite.Txt2Img(base).run("x", width=100000, height=64, steps=1, seed=0)


LIMITED = """
import resource, sys
sys.path.insert(0, {tests!r})
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a run that tries to allocate fails, not the machine
import PIL.Image, editsuite
from tiny import tiny_bundle
base, photo = tiny_bundle(), PIL.Image.new("RGB", (64, 64))
try:
    {call}
except editsuite.UserError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("call, message", [
    ('editsuite.Txt2Img(base).run("x", num_images=100000, steps=1, seed=0)',
     "100000 x 64x64 = 409,600,000 pixels, over the bound of 16,777,216"),
    ('editsuite.Outpaint(base).run(photo, "x", left=20000, steps=1, seed=0)',
     "the output would be 20064x64 pixels; at most 16384 a side"),
])
def test_a_run_that_would_exhaust_memory_is_refused_by_the_python_api(call, message):
    """In a subprocess with its address space limited (6 GiB): without the bound these end in a memory error."""
    import subprocess
    import sys
    from pathlib import Path

    code = LIMITED.format(tests=str(Path(__file__).parent), call=call)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and message in done.stdout and "refused:" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("make, message", [
    (lambda base, photo: editsuite.Upscale(base, max_output_pixels=2_000_000).run(photo, "x", scale=8, num_images=9),
     "9 x 512x512 = 2,359,296 pixels, over the bound of 2,000,000"),
    (lambda base, photo: editsuite.Img2Img(base, max_output_pixels=8000).run(photo, "x", num_images=2, steps=1),
     "2 x 64x64 = 8,192 pixels, over the bound of 8,000"),
])
def test_a_run_over_the_output_bound_is_refused_before_any_work(base, photo, make, message):
    """The Python API bounds a run's pictures as the CLI does (a memory traceback otherwise); the bound is the
    task's `max_output_pixels`."""
    with pytest.raises(editsuite.UserError, match=re.escape(message)):
        make(base, photo)
    assert len(editsuite.Img2Img(base, max_output_pixels=8192).run(photo, "x", num_images=2, steps=1).images) == 2
