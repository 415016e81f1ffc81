"""Fuzzing with a fixed seed and bounded examples: malformed images, masks and recipes never end in a
traceback (only `UserError`, a one-line message) and never leave a file behind."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from editsuite.batch import Batch, load_recipe
from editsuite.errors import UserError
from editsuite.imaging.io import open_image, open_mask, peek_size

FUZZ = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _valid_files() -> list[bytes]:
    """Small valid images in several formats and modes: the seeds that mutations start from."""
    rng = np.random.default_rng(0)
    out = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("PNG", "I;16"),
                      ("JPEG", "RGB"), ("JPEG", "CMYK"), ("WEBP", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("TIFF", "F")):
        arr = rng.integers(0, 255, (12, 9, 3), dtype=np.uint8)
        im = PIL.Image.fromarray(arr).convert(mode) if mode not in ("I;16", "F") else \
            PIL.Image.fromarray(arr[..., 0].astype(np.uint16 if mode == "I;16" else np.float32) * 3)
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


VALID = _valid_files()


@st.composite
def malformed(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "random", "header"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "random":
        data = bytearray(draw(st.binary(min_size=0, max_size=256)))
    else:  # a valid header with garbage after it
        data = data[:16] + draw(st.binary(min_size=0, max_size=128))
    return bytes(data)


def _only_user_errors(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except UserError as e:
        assert "\n" not in str(e)
        return None


@FUZZ
@seed(20261127)
@given(data=malformed())
def test_fuzz_images_and_masks(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("img")
    path = folder / "input.png"
    path.write_bytes(data)
    for fn in (open_image, open_mask, peek_size):
        result = _only_user_errors(fn, path, max_pixels=1_000_000)
        if result is not None and fn is not peek_size:
            assert result.mode in ("RGB", "L")
    assert sorted(p.name for p in folder.iterdir()) == ["input.png"]


KEYS = ["task", "model", "max_pixels", "inputs", "params", "output", "seed", "images", "mask", "masks", "prompts",
        "prompt", "steps", "strength", "width", "folder", "name", "base", "mode", "scheduler", "guidance_scale", "x"]
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
              st.sampled_from(["img2img", "inpaint", "txt2img", "upscale", "outpaint", "in/*.png", "out", "../..",
                               "{stem}.png", "{index:04d}-{seed}.png", "../{stem}.png", "/etc/x.png", "{", "m.png",
                               "derived", "fixed", "euler", ""]),
              st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.sampled_from(KEYS), children,
                                                                                max_size=4)),
    max_leaves=12)


def _toml(value) -> str:
    """A small TOML writer for fuzzed values (None becomes a missing key)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value if v is not None) + "]"
    return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items() if v is not None) + "}"


@FUZZ
@seed(20261127)
@given(doc=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=7), garbage=st.text(max_size=20))
def test_fuzz_recipes(tmp_path_factory, doc, garbage):
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "in").mkdir()
    PIL.Image.new("RGB", (64, 64)).save(folder / "in" / "a.png")
    PIL.Image.new("L", (64, 64)).save(folder / "m.png")
    text = "\n".join(f"{k} = {_toml(v)}" for k, v in doc.items() if v is not None)
    for variant in (text, text + "\n" + garbage):
        path = folder / "recipe.toml"
        path.write_text(variant)
        recipe = _only_user_errors(load_recipe, path)
        if recipe is not None:
            batch = _only_user_errors(Batch, recipe)
            if batch is not None:
                for item in batch.items:  # every planned output stays inside the output folder
                    assert item.output.parent == recipe.folder.resolve()
                batch.plan()
    made = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    assert made == ["in", "in/a.png", "m.png", "recipe.toml"], made  # reading a recipe writes nothing


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@seed(20261127)
@given(data=malformed(), as_mask=st.booleans())
def test_fuzz_the_cli_on_malformed_inputs(tmp_path_factory, capsys, data, as_mask):
    """Bad files through the whole command: exit code 2, one line, nothing written."""
    from editsuite.cli.app import main

    folder = tmp_path_factory.mktemp("cli")
    bad = folder / "bad.png"
    bad.write_bytes(data)
    try:
        open_image(bad) if not as_mask else open_mask(bad)
        return  # a mutation that still decodes is a valid input: not what this test is about
    except UserError:
        pass
    good = folder / "good.png"
    PIL.Image.new("RGB", (64, 64)).save(good)
    out = folder / "out"
    args = ["inpaint", str(good), "--mask", str(bad)] if as_mask else ["img2img", str(bad)]
    code = main(args + ["-p", "x", "-o", str(out / "o.png"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()


LOADED: list[str] = []  # names of the fuzzed recipes that loaded, so the test below can say it checked some


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@seed(20261129)
@given(name=st.one_of(
    st.sampled_from(["{stem}.png", "{index:04d}-{seed}.png", "{stem}-{task}.webp", "../{stem}.png", "/etc/x.png",
                     "sub/{stem}.png", "{stem}/../../x.png", ".{stem}.png", "{stem}.png/..", "{seed:>8}.png",
                     "..png", "{stem}.exe", "{stem}\x00.png", "~/{stem}.png", "{stem}.jpg"]),
    st.text(max_size=14).map(lambda t: "{stem}" + t + ".png"),
    st.text(max_size=14).map(lambda t: t + ".png")),
    folder=st.sampled_from(["out", "in", "../out", "out/../out", ".", "out/sub", "/tmp/editsuite-fuzz-abs"]))
def test_fuzz_output_names_of_a_valid_recipe_stay_inside_its_folder(tmp_path_factory, name, folder):
    """A valid recipe with a fuzzed output name and folder: either a one-line error, or every output inside
    the folder. Unlike the free-form fuzz above, most of these recipes load, so the check really runs."""
    import json

    root = tmp_path_factory.mktemp("recipe")
    (root / "in").mkdir()
    PIL.Image.new("RGB", (64, 64)).save(root / "in" / "a.png")
    (root / "recipe.toml").write_text(
        'task = "img2img"\n[inputs]\nimages = ["in/*.png"]\n[params]\nprompt = "x"\nstrength = 0.5\n'
        f"[output]\nfolder = {json.dumps(folder)}\nname = {json.dumps(name)}\n")
    recipe = _only_user_errors(load_recipe, root / "recipe.toml")
    if recipe is None:
        return
    for item in Batch(recipe).items:
        assert item.output.parent == recipe.folder.resolve(), (name, folder, item.output)
        assert not item.output.name.startswith(".")
    LOADED.append(name)


def test_the_output_name_fuzz_checked_loaded_recipes():
    """Run after the fuzz above (same module, file order): a fuzz that loads nothing proves nothing."""
    print(f"{len(LOADED)} fuzzed recipes loaded and were checked")
    assert len(LOADED) >= 50, len(LOADED)
