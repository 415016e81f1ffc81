"""Batch recipes: the shipped examples run, recipe errors name key and value, bad items are recorded and
skipped, existing files are kept, and a batch killed with SIGKILL at random points (>= 20 times) finishes on
rerun with every output exactly once, whole, and equal to an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from editsuite.batch import Batch, load_recipe
from editsuite.batch.runner import JOURNAL
from editsuite.cli.app import main
from editsuite.demo.scenes import render, sample_scene
from editsuite.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "tasks").glob("*.toml"))


def _fast(recipe, folder: Path, steps: int = 3):
    return dataclasses.replace(recipe, folder=folder, params={**recipe.params, "steps": steps})


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_run_on_the_samples(path, tmp_path):
    recipe = _fast(load_recipe(path), tmp_path / "out")
    results = list(Batch(recipe).run())
    assert results and all(r.status == "done" for r in results), results
    for r in results:
        assert PIL.Image.open(r.output).size[0] >= 64
    again = list(Batch(recipe).run())  # a rerun redoes nothing
    assert [r.status for r in again] == ["finished"] * len(results)


def _write_recipe(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


def _scenes(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"scene{i:02d}.png"
        PIL.Image.fromarray(render(sample_scene(rng), 64)).save(p)
        paths.append(p)
    return paths


BASE = """
task = "img2img"
[inputs]
images = ["in/*.png"]
[params]
prompt = "a red circle on a blue background"
strength = 0.5
steps = 4
[output]
folder = "out"
[seed]
base = 5
"""


@pytest.mark.parametrize("edit, message", [
    (("task = \"img2img\"", "task = \"paint\""), "task = 'paint' is not allowed: use one of txt2img"),
    (("strength = 0.5", "strength = 1.5"), "params.strength = 1.5 is not allowed: strength must be between 0 and 1"),
    (("strength = 0.5", "strength = \"high\""), "params.strength = 'high' is not allowed: it must be a number"),
    (("steps = 4", "steps = 0"), "params.steps = 0 is not allowed"),
    (("steps = 4", "stepz = 4"), "params.stepz = 4 is not allowed: img2img takes"),
    (("steps = 4", "seed = 4"), "the seed is set in [seed]"),
    (("steps = 4", "scheduler = \"fast\""), "params.scheduler = 'fast' is not allowed: use one of"),
    (("folder = \"out\"", "folder = \"out\"\nname = \"../{stem}.png\""), "not a file name inside output.folder"),
    (("folder = \"out\"", "folder = \"out\"\nname = \"sub/{stem}.png\""), "not a file name inside output.folder"),
    (("folder = \"out\"", "folder = \"out\"\nname = \"{stem}.exe\""), "not a file name inside output.folder"),
    (("folder = \"out\"", "folder = \"out\"\nname = \"{user}.png\""), "not {user}"),
    (("folder = \"out\"", "folder = \"out\"\nname = \"same.png\""), "gives 'same.png' to both"),
    (("folder = \"out\"", "folder = \"out\"\nname = \"{seed:>99999999}.png\""), "widths are at most 64"),
    (("folder = \"out\"", "folder = \"out\"\nname = \"{stem}" + "x" * 250 + ".png\""), "at most 200 bytes"),
    (("steps = 4", "steps = 4\nguidance_scale = nan"), "guidance scale must be between 0 and 100 (got nan)"),
    (("steps = 4", "steps = 4\nguidance_scale = inf"), "guidance scale must be between 0 and 100 (got inf)"),
    (("steps = 4", "steps = 4\nwidth = 100000"), "width must be at most 16384 pixels (got 100000)"),
    (("base = 5", "base = -1"), "seed.base = -1 is not allowed"),
    (("base = 5", "mode = \"random\""), "seed.mode = 'random' is not allowed: derived or fixed"),
    (("images = [\"in/*.png\"]", "images = [\"nowhere/\"]"), "inputs.images entry 'nowhere/': no such file"),
    (("images = [\"in/*.png\"]", "images = [\"in/*.jpg\"]"), "matches no image"),
    (("images = [\"in/*.png\"]", "images = [\"in/*.png\"]\nmask = \"m.png\""), "only inpaint takes a mask"),
    (("[seed]", "[sead]"), "sead = "),
    (("[params]", "[params"), "is not valid TOML"),
])
def test_recipe_errors_name_key_value_and_what_is_allowed(tmp_path, edit, message):
    _scenes(tmp_path / "in", 2)
    path = _write_recipe(tmp_path, BASE.replace(*edit))
    with pytest.raises(UserError) as err:
        Batch(load_recipe(path))
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_item_is_recorded_and_the_batch_goes_on(tmp_path, capsys):
    _scenes(tmp_path / "in", 3)
    (tmp_path / "in" / "scene01.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # corrupt
    big = tmp_path / "in" / "huge.png"
    PIL.Image.new("RGB", (300, 300)).save(big)
    path = _write_recipe(tmp_path, "max_pixels = 65536\n" + BASE)
    assert main(["batch", str(path)]) == 1
    err = capsys.readouterr().err
    assert "2 done, 0 finished before, 2 failed" in err
    assert "huge.png' is 300x300" in err and "scene01.png' is not an image" in err
    journal = [json.loads(l) for l in (tmp_path / "out" / JOURNAL).read_text().splitlines()]
    assert sorted(r["status"] for r in journal) == ["done", "done", "failed", "failed"]
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    _scenes(tmp_path / "in", 1)
    path = _write_recipe(tmp_path, BASE)
    (item,) = Batch(load_recipe(path)).items
    item.output.parent.mkdir(parents=True)
    item.output.write_bytes(b"mine")
    assert main(["batch", str(path), "-q"]) == 1
    assert item.output.read_bytes() == b"mine"
    assert main(["batch", str(path), "-q", "--overwrite"]) == 0
    assert PIL.Image.open(item.output).size == (64, 64)


def test_dry_run_lists_and_writes_nothing(tmp_path, capsys):
    _scenes(tmp_path / "in", 2)
    path = _write_recipe(tmp_path, BASE)
    assert main(["batch", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("run ") == 2 and "nothing was done" in out
    assert not (tmp_path / "out").exists()


def test_python_api_loads_once_and_reuses_prompt_encodings(tmp_path):
    from editsuite.bundle.loader import load_bundle
    from editsuite.demo import demo_model
    from editsuite.bundle.manifest import ModelKind

    _scenes(tmp_path / "in", 3)
    recipe = load_recipe(_write_recipe(tmp_path, BASE))
    bundle = load_bundle(demo_model(ModelKind.BASE), device="cpu", dtype="float32")
    calls = []
    encode = bundle.backend.encode_text
    bundle.backend.encode_text = lambda ids: calls.append(1) or encode(ids)
    results = list(Batch(recipe, bundle=bundle).run())
    assert [r.status for r in results] == ["done"] * 3
    assert len(calls) == 2  # the prompt and the empty negative prompt, once each for three items


def _decode(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _same_threads_everywhere(monkeypatch) -> None:
    """bf16 results depend on the thread count, which the governor fits to the machine's load: pinned to
    torch's own count (OMP_NUM_THREADS, inherited by the batch processes), a reference run here and the
    batch processes compute alike whatever else the machine is doing."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))


def test_sigkill_at_random_points_then_rerun_loses_nothing(tmp_path, monkeypatch):
    """>= 20 SIGKILLs at random points (during start-up, a step, a save); after each, the outputs present are
    whole and right; the rerun that completes leaves each output exactly once, equal to an uninterrupted run."""
    _same_threads_everywhere(monkeypatch)
    _scenes(tmp_path / "in", 6)
    path = _write_recipe(tmp_path, BASE.replace("steps = 4", "steps = 3"))
    reference = _fast(load_recipe(path), tmp_path / "reference", steps=3)
    expected = {r.output.name: _decode(r.output) for r in Batch(reference).run()}
    assert len(expected) == 6
    out = tmp_path / "out"
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "editsuite.cli.app", "batch", str(path)]
    kills = cycles = 0
    while kills < 20:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
        wait_for = rng.randint(0, 3)  # items to see finished first (0: kill during start-up or the first item)
        seen = 0
        for line in proc.stderr:
            if line.startswith("batch ") and "items" in line and wait_for == 0:
                break
            if line.startswith("done"):
                seen += 1
                if seen >= wait_for:
                    break
        time.sleep(rng.uniform(0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stderr.close()
        _check_partial(out, expected)
        if all((out / name).exists() for name in expected):  # finished: check, and start a new cycle
            # (the kill may have come between the last rename and its journal line: the same command, run
            # again, journals that item without making it again)
            assert subprocess.run(cmd + ["-q"], env=env).returncode == 0
            _check_complete(out, expected)
            cycles += 1
            for p in out.iterdir():
                p.unlink()
    assert subprocess.run(cmd + ["-q"], env=env).returncode == 0
    _check_complete(out, expected)


def _check_partial(out: Path, expected: dict) -> None:
    if not out.exists():
        return
    for p in out.iterdir():
        if p.name == JOURNAL or p.name.endswith(".tmp"):
            continue  # hidden temporaries are removed by the next run
        assert p.name in expected, p.name
        assert np.array_equal(_decode(p), expected[p.name]), p.name


def _check_complete(out: Path, expected: dict) -> None:
    names = sorted(p.name for p in out.iterdir() if p.name != JOURNAL)
    assert names == sorted(expected), names  # exactly once each, no temporaries left
    for name, pixels in expected.items():
        assert np.array_equal(_decode(out / name), pixels), name
    done = [json.loads(l) for l in (out / JOURNAL).read_text().splitlines() if l.strip().endswith("}")]
    done = [r["output"] for r in done if r.get("status") == "done"]
    assert sorted(done) == sorted(expected)  # each item made (and journaled) once: nothing redone


def test_ctrl_c_stops_after_the_current_step_and_rerun_finishes(tmp_path):
    _scenes(tmp_path / "in", 4)
    path = _write_recipe(tmp_path, BASE.replace("steps = 4", "steps = 15").replace("strength = 0.5", "strength = 1.0"))
    cmd = [sys.executable, "-m", "editsuite.cli.app", "batch", str(path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stderr:
        if line.startswith("done"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait() == 130
    assert "stopped; run the same command again to finish" in rest
    assert "Traceback" not in rest
    made = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".png")
    assert 1 <= len(made) < 4
    assert subprocess.run(cmd + ["-q"]).returncode == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


def test_inpaint_masks_by_name_missing_or_mismatched_are_bad_items(tmp_path, capsys):
    _scenes(tmp_path / "in", 3)
    (tmp_path / "masks").mkdir()
    box = np.zeros((64, 64), np.uint8)
    box[16:48, 16:48] = 255
    PIL.Image.fromarray(box).save(tmp_path / "masks" / "scene00.png")
    PIL.Image.fromarray(box[:32]).save(tmp_path / "masks" / "scene01.png")  # another size
    recipe = BASE.replace('task = "img2img"', 'task = "inpaint"').replace("strength = 0.5", "strength = 1.0")
    recipe = recipe.replace('images = ["in/*.png"]', 'images = ["in/*.png"]\nmasks = "masks/{stem}.png"')
    path = _write_recipe(tmp_path, recipe)
    assert main(["batch", str(path)]) == 1
    err = capsys.readouterr().err
    assert "1 done, 0 finished before, 2 failed" in err
    assert "scene02.png' not found" in err and "mask" in err


def test_journal_is_never_followed_through_a_link_and_foreign_temporaries_stay(tmp_path, capsys):
    """A link planted as the journal is refused (the file it points to is untouched); a file named like a
    temporary that this recipe did not write survives the run; a journal line whose item is not a name is
    skipped, not a traceback."""
    _scenes(tmp_path / "in", 1)
    path = _write_recipe(tmp_path, BASE.replace("steps = 4", "steps = 2"))
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / JOURNAL).symlink_to(victim)
    (out / ".abcdefgh.tmp").write_text("not editsuite's")
    assert main(["batch", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a plain file" in err[0], err
    assert victim.read_text() == "keep me"
    (out / JOURNAL).unlink()
    fingerprint = load_recipe(path).fingerprint()
    (out / JOURNAL).write_text(json.dumps({"fingerprint": fingerprint, "item": ["a", "list"]}) + "\n")
    assert main(["batch", str(path), "-q"]) == 0
    assert (out / ".abcdefgh.tmp").read_text() == "not editsuite's"
    assert len(list(out.glob("*.png"))) == 1


def test_journal_that_is_a_folder_is_one_line(tmp_path, capsys):
    _scenes(tmp_path / "in", 1)
    path = _write_recipe(tmp_path, BASE)
    (tmp_path / "out" / JOURNAL).mkdir(parents=True)
    assert main(["batch", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a plain file" in err[0], err


def test_outputs_in_the_input_folder_are_never_inputs(tmp_path, capsys):
    """A recipe whose output folder is its input folder: reruns find the same 2 inputs, not their outputs too."""
    _scenes(tmp_path / "in", 2)
    path = _write_recipe(tmp_path, BASE.replace("steps = 4", "steps = 2").replace('folder = "out"', 'folder = "in"'))
    for _ in range(3):
        assert main(["batch", str(path), "-q"]) == 0
        assert len(list((tmp_path / "in").glob("*.png"))) == 4  # 2 inputs + 2 outputs, every time
    assert main(["batch", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "2 file(s) matched by inputs.images are this recipe's own outputs" in printed
    assert "0 of 2 items to run" in printed


def test_an_output_renamed_but_not_journaled_is_finished_not_redone(tmp_path, capsys):
    """The window a kill can hit between an output's rename and its journal line: the file is whole, the
    journal does not know it. Its own metadata (this recipe, this item) makes it finished: kept, not redone,
    not a conflict, and journaled on the rerun."""
    _scenes(tmp_path / "in", 2)
    path = _write_recipe(tmp_path, BASE.replace("steps = 4", "steps = 2"))
    assert main(["batch", str(path), "-q"]) == 0
    journal = tmp_path / "out" / JOURNAL
    journal.write_text(journal.read_text().splitlines()[0] + "\n")  # the second item's line never made it
    outputs = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}
    assert sorted(action for _, action in Batch(load_recipe(path)).plan()) == ["finished", "finished"]
    capsys.readouterr()
    assert main(["batch", str(path)]) == 0
    assert "0 done, 2 finished before, 0 failed" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs
    done = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted(r["status"] for r in done) == ["done", "done"]


def test_an_item_over_the_output_bound_fails_before_the_model_loads(tmp_path):
    """outpaint left = 20000 (or a picture over max_output_pixels) fails its items with one line each, and the
    model is never loaded: the recipe's model does not even exist."""
    _scenes(tmp_path / "in", 2)
    text = BASE.replace('task = "img2img"', 'task = "outpaint"\nmodel = "no-such-model"').replace(
        "strength = 0.5", "left = 20000")
    results = list(Batch(load_recipe(_write_recipe(tmp_path, text))).run())
    assert [r.status for r in results] == ["failed", "failed"]
    assert all("20064x64 pixels; at most 16384 a side" in r.reason for r in results)
    small = BASE.replace('task = "img2img"', 'task = "outpaint"\nmodel = "no-such-model"\nmax_output_pixels = 5000'
                         ).replace("strength = 0.5", "left = 16")
    results = list(Batch(load_recipe(_write_recipe(tmp_path / "b", small.replace("in/*.png", "../in/*.png")))).run())
    assert all("80x64 = 5,120 pixels, over the bound of 5,000" in r.reason for r in results)
    assert not (tmp_path / "out").exists() or not any(p.suffix == ".png" for p in (tmp_path / "out").iterdir())


def test_a_read_only_output_folder_is_one_error_before_the_model_loads(tmp_path, read_only):
    _scenes(tmp_path / "in", 2)
    text = BASE.replace('task = "img2img"', 'task = "img2img"\nmodel = "no-such-model"').replace(
        'folder = "out"', f'folder = "{read_only}"')
    with pytest.raises(UserError, match="it is on a read-only file system"):
        list(Batch(load_recipe(_write_recipe(tmp_path, text))).run())


KILL_AT = r"""
import os, signal, sys
from pathlib import Path
from editsuite.batch import runner
from editsuite.cli.app import main
from editsuite.imaging import output

point, target, recipe = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = {"saves": 0, "lines": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_move = output._move_no_clobber
def move(tmp, path):  # the last step of save_atomic: the whole temporary file becomes the output
    hit = seen["saves"] == target
    seen["saves"] += 1
    if hit and point == "before-rename":
        die()
    real_move(tmp, path)
    if hit and point == "after-rename":
        die()
output._move_no_clobber = move

real_fsync = os.fsync
def fsync(fd):  # the journal's line is written and flushed: tear it in half before it is made durable
    if os.readlink(f"/proc/self/fd/{fd}").endswith(runner.JOURNAL) and point == "torn-journal":
        seen["lines"] += 1
        if seen["lines"] == target + 1:
            size = os.fstat(fd).st_size
            last = Path(os.readlink(f"/proc/self/fd/{fd}")).read_bytes().rsplit(b"\n", 2)[-2]
            os.ftruncate(fd, size - len(last) // 2 - 1)
            die()
    real_fsync(fd)
os.fsync = fsync
sys.exit(main(["batch", recipe, "-q"]))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="aims through /proc/self/fd (Linux)")
def test_sigkill_aimed_at_each_window_of_a_save(tmp_path, monkeypatch):
    """SIGKILL exactly between a temporary file and its rename, then (on the rerun) between a rename and its
    journal line, then in the middle of a journal line: each leaves the state aimed at, each rerun recovers
    from it, and the last ends with each output once, equal to an uninterrupted run, each journaled once."""
    _scenes(tmp_path / "in", 4)
    path = _write_recipe(tmp_path, BASE.replace("steps = 4", "steps = 2"))
    _same_threads_everywhere(monkeypatch)
    reference = _fast(load_recipe(path), tmp_path / "reference", steps=2)
    expected = {r.output.name: _decode(r.output) for r in Batch(reference).run()}
    out = tmp_path / "out"

    def kill_at(point, target):
        assert subprocess.run([sys.executable, "-c", KILL_AT, point, str(target), str(path)]).returncode == \
            -signal.SIGKILL
        _check_partial(out, expected)
        return sorted(p.name for p in out.glob("*.png")), (out / JOURNAL).read_text().splitlines()

    made, lines = kill_at("before-rename", 1)  # the second output: a whole temporary file, not renamed
    assert len(made) == 1 and len(lines) == 1 and len(list(out.glob(".*.tmp"))) == 1
    made, lines = kill_at("after-rename", 0)  # the rerun's first save: renamed, not journaled
    assert len(made) == 2 and len(lines) == 1 and not list(out.glob(".*.tmp"))
    made, lines = kill_at("torn-journal", 1)  # the rerun journals the renamed one, then tears the next line
    assert len(made) == 3 and len(lines) == 3 and lines[1].endswith("}") and not lines[2].endswith("}")
    assert subprocess.run([sys.executable, "-m", "editsuite.cli.app", "batch", str(path), "-q"]).returncode == 0
    _check_complete(out, expected)
