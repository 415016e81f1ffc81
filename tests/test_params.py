"""One typed source for every edit's parameters: the CLI, recipes, `Task.run` and the JSON description all come
from the task classes' definitions (tasks/params.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
from tiny import tiny_bundle
from typer.testing import CliRunner

import editsuite
from editsuite.batch import load_recipe
from editsuite.cli.app import build_app, main
from editsuite.errors import UserError
from editsuite.tasks import TASKS, describe
from editsuite.tasks.params import Param

SEEN: list[float] = []


class Sharpen(editsuite.Txt2Img):
    """A test edit: txt2img with one parameter more, defined once, below."""

    name = "sharpen"
    summary = "Paint, then sharpen (a test edit)."
    params = (*editsuite.Txt2Img.params,
              Param("sharpness", float, 0.5, "How much to sharpen (a test parameter).", low=0, high=1))

    def _run(self, *, v, callback):
        SEEN.append(v.sharpness)
        return super()._run(v=v, callback=callback)


@pytest.fixture
def sharpen(monkeypatch):
    monkeypatch.setitem(TASKS, Sharpen.name, Sharpen)
    return Sharpen


def test_a_parameter_defined_once_reaches_the_cli_recipes_the_api_and_the_description(sharpen, tmp_path):
    # the CLI: an option with its help text, and its value reaches the task
    help_text = CliRunner().invoke(build_app(), ["sharpen", "--help"], env={"COLUMNS": "200"}).output
    assert "--sharpness" in help_text and "How much to sharpen (a test parameter)." in help_text
    # the Python API: a keyword of run, checked by its definition
    bundle = tiny_bundle()
    sharpen(bundle).run("x", sharpness=0.25, steps=1, seed=0)
    assert SEEN[-1] == 0.25
    with pytest.raises(UserError, match=r"sharpness must be between 0 and 1 \(got 2\)"):
        sharpen(bundle).run("x", sharpness=2, steps=1)
    # recipes: the key is allowed, typed and checked
    (tmp_path / "r.toml").write_text('task = "sharpen"\ninputs.prompts = ["x"]\n[params]\nsharpness = 0.75\n'
                                     '[output]\nfolder = "out"\n')
    assert load_recipe(tmp_path / "r.toml").params == {"sharpness": 0.75}
    (tmp_path / "r.toml").write_text('task = "sharpen"\ninputs.prompts = ["x"]\n[params]\nsharpness = "high"\n'
                                     '[output]\nfolder = "out"\n')
    with pytest.raises(UserError, match=r"params.sharpness = 'high' is not allowed: it must be a number"):
        load_recipe(tmp_path / "r.toml")
    # the description, from Python and from `editsuite tasks --json`
    (mine,) = [t for t in describe() if t["name"] == "sharpen"]
    assert {"name": "sharpness", "type": "float", "default": 0.5, "min": 0, "max": 1} .items() <= \
        [p for p in mine["params"] if p["name"] == "sharpness"][0].items()
    printed = CliRunner().invoke(build_app(), ["tasks", "--json"]).output
    assert "sharpness" in [p["name"] for t in json.loads(printed) if t["name"] == "sharpen" for p in t["params"]]


def test_the_description_lists_every_edit_and_parameter(capsys):
    assert main(["tasks", "--json"]) == 0
    tasks = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert list(tasks) == ["txt2img", "img2img", "inpaint", "outpaint", "upscale"]
    assert tasks["inpaint"]["inputs"] == ["image", "mask"]
    params = {p["name"]: p for p in tasks["inpaint"]["params"]}
    assert params["strength"] == {**params["strength"], "type": "float", "default": 1.0, "min": 0, "max": 1}
    assert "euler-a" in params["scheduler"]["choices"] and params["guidance_scale"]["cli"] == ["--guidance", "-g"]
    assert params["overlay"]["cli"] is None  # the Python API's only


def test_sizes_follow_the_models_vae_factor_on_the_cli_too(tmp_path, monkeypatch, capsys):
    """The demo model's VAE factor is 4: width 68 works there, 66 is refused with the nearest valid sizes."""
    monkeypatch.chdir(tmp_path)
    assert main(["txt2img", "-p", "a red circle", "--width", "68", "--steps", "1", "-s", "1", "-q", "-o", "a.png"]) == 0
    assert PIL.Image.open(tmp_path / "a.png").size == (68, 64)
    assert main(["txt2img", "-p", "a red circle", "--width", "66", "--steps", "1", "-q", "-o", "b.png"]) == 2
    assert "width 66 is not a multiple of 4; use 64 or 68" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--backend", "gpu"], "'gpu' is not one of 'auto', 'torch', 'coreml'"),
    (["--dtype", "int8"], "'int8' is not one of"),
    (["--scheduler", "fast"], "unknown scheduler 'fast'; use one of: dpm++2m"),
    (["--steps", "0"], "steps must be at least 1 (got 0)"),
    (["--expand", "8", "--left", "8"], "give either --expand or --left/--right/--top/--bottom, not both"),
])
def test_choices_and_rules_are_one_line_errors(tmp_path, monkeypatch, capsys, photo, args, message):
    monkeypatch.chdir(tmp_path)
    photo.save("p.png")
    sides = [] if "--expand" in args else ["--right", "8"]
    assert main(["outpaint", "p.png", "-p", "x", "-m", "no-such-model", *sides, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_no_import_cycle_and_no_locals():
    """bundle/ never imports convert/ (convert builds on bundle); scoring the demo family needs its data, not
    its training script; no command passes locals() around."""
    code = ("import sys, editsuite.bundle.loader, editsuite.bundle.coreml_backend, editsuite.bundle.coreml_layout, "
            "editsuite.demo.score; print([m for m in sys.modules if m.startswith(('editsuite.convert', "
            "'editsuite.demo.train', 'editsuite.demo.fitting'))])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    root = Path(editsuite.__file__).parent
    assert not [p for p in root.rglob("*.py") if "locals()" in p.read_text()]


def test_edge_values_of_the_python_api(tmp_path):
    bundle = tiny_bundle()
    assert editsuite.Txt2Img(bundle).run(None, negative_prompt=None, steps=1, seed=0).metadata["prompt"] == ""
    with pytest.raises(UserError, match="would pass the largest seed"):  # image 1 would take seed 2^63
        editsuite.Txt2Img(bundle).run("x", seed=2**63 - 1, num_images=2, steps=1)
    with pytest.raises(UserError, match="max_output_pixels must be a positive whole number"):
        editsuite.Txt2Img(bundle, max_output_pixels=None)
    # one side given: the other is the model's, so the size (and its bound) is known only once it loads
    assert editsuite.Txt2Img.output_size({"width": 4096}) is None


def test_a_recipe_whose_size_the_model_cannot_take_fails_once(tmp_path):
    """width 66 on the demo model (factor 4): one error for the recipe, nothing written, not a failure per item."""
    from editsuite.batch import Batch

    for i in range(2):
        PIL.Image.new("RGB", (64, 64), (i * 90, 40, 200)).save(tmp_path / f"in{i}.png")
    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "img2img"\ninputs.images = ["in*.png"]\n[params]\nwidth = 66\nsteps = 1\n'
                      '[output]\nfolder = "out"\n')
    with pytest.raises(UserError, match=r"\[params\] for this model: width 66 is not a multiple of 4; use 64 or 68"):
        list(Batch(load_recipe(recipe)).run())
    assert not (tmp_path / "out").exists()
    recipe.write_text('task = "txt2img"\ninputs.prompts = ["x"]\n[params]\nprompt = "y"\n[output]\nfolder = "o"\n')
    with pytest.raises(UserError, match=r"params.prompt = 'y' is not allowed: .*comes from inputs.prompts"):
        load_recipe(recipe)
