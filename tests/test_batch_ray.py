"""Batches on Ray, with a local Ray instance (2 CPUs, no network): the pictures equal the local engine's pixel
for pixel, a bad item is recorded and the rest finish, a worker killed with SIGKILL mid-batch and a driver killed
with SIGKILL (then rerun) lose nothing and do nothing twice; without Ray, --ray is one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

from editsuite.batch import Batch, load_recipe
from editsuite.batch.runner import JOURNAL
from editsuite.cli.app import _ray_flag, main
from editsuite.errors import UserError
from test_batch import BASE, _check_complete, _decode, _scenes, _write_recipe

ON_RAY = BASE + '[run]\nengine = "ray"\nworkers = 2\n'


@pytest.fixture
def one_thread(monkeypatch):
    """A Ray worker with one CPU computes with one thread (Ray sets OMP_NUM_THREADS=1 in it); the local
    reference here does too, and so do the batch processes this test starts (they inherit it)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def _reference(path: Path, folder: Path) -> dict:
    recipe = dataclasses.replace(load_recipe(path), folder=folder)
    results = list(Batch(recipe, engine="local").run())
    return {r.output.name: _decode(r.output) for r in results if r.status == "done"}


def test_ray_pictures_equal_the_local_engine_and_a_bad_item_is_recorded(tmp_path, one_thread):
    import ray

    _scenes(tmp_path / "in", 12)
    (tmp_path / "in" / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    path = _write_recipe(tmp_path, ON_RAY)
    expected = _reference(path, tmp_path / "reference")
    assert len(expected) == 12
    notices = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        results = list(Batch(load_recipe(path)).run(on_notice=notices.append))  # [run] engine = "ray"
    finally:
        ray.shutdown()
    assert "ray: 2 workers (1 CPU each)" in notices[0], notices
    assert sorted(r.status for r in results) == ["done"] * 12 + ["failed"]
    (bad,) = [r for r in results if r.status == "failed"]
    assert bad.key == "in/zz-corrupt.png" and "is not an image Pillow can read" in bad.reason
    out = tmp_path / "out"
    _check_complete_but_failed(out, expected, failed=["in/zz-corrupt.png"])


def _check_complete_but_failed(out: Path, expected: dict, failed: list[str]) -> None:
    """Every good item's picture exactly once and equal to the reference; the journal records each item once."""
    _check_complete(out, expected)
    records = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    assert sorted(r["item"] for r in records if r["status"] == "failed") == failed
    assert len({r["item"] for r in records}) == len(records)  # no item twice, done or failed


def _start(path: Path) -> subprocess.Popen:
    """`editsuite batch RECIPE --ray` in a session of its own: its Ray instance's processes are that session's."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "editsuite.cli.app", "batch", str(path), "--ray"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)


def _ray_workers(session: int) -> list[tuple[int, str]]:
    """(pid, title) of the editsuite Ray workers of a session: Ray titles them ray::EditsuiteWorker[.method]."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) != session:
                continue
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if title.startswith("ray::EditsuiteWorker"):
            found.append((int(proc.name), title))
    return found


def _end_session(session: int) -> None:
    """What is left of a killed driver's Ray instance (its agents linger a minute) goes with the test."""
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds Ray's workers through /proc (Linux)")
def test_a_ray_worker_killed_mid_batch_loses_nothing_and_does_nothing_twice(tmp_path, one_thread):
    _scenes(tmp_path / "in", 12)
    path = _write_recipe(tmp_path, ON_RAY.replace("steps = 4", "steps = 10"))
    expected = _reference(path, tmp_path / "reference")
    proc = _start(path)
    lines, killed = [], None
    try:
        for line in proc.stderr:
            lines.append(line)
            if killed is None and line.startswith("done"):
                busy = [pid for pid, title in _ray_workers(proc.pid) if title.endswith(".make")]
                killed = busy[0] if busy else None
                if killed is not None:
                    os.kill(killed, signal.SIGKILL)
        code = proc.wait()
    finally:
        _end_session(proc.pid)
    text = "".join(lines)
    assert killed is not None, text
    assert code == 0, text
    moved = re.search(r"ray: a worker was lost \(\w+\); (\d+) item\(s\) go to another worker", text)
    assert moved and int(moved.group(1)) >= 1, text
    assert "12 done, 0 finished before, 0 failed" in text
    _check_complete(tmp_path / "out", expected)


def test_the_driver_killed_then_rerun_finishes_without_redoing_items(tmp_path, one_thread):
    _scenes(tmp_path / "in", 12)
    path = _write_recipe(tmp_path, ON_RAY.replace("steps = 4", "steps = 10"))
    expected = _reference(path, tmp_path / "reference")
    proc = _start(path)
    try:
        done = 0
        for line in proc.stderr:
            done += line.startswith("done")
            if done == 4:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
        proc.stderr.close()
    finally:
        _end_session(proc.pid)
    made = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert 4 <= len(made) < 12, made
    rerun = _start(path)
    try:
        text = rerun.stderr.read()
        assert rerun.wait() == 0, text
    finally:
        _end_session(rerun.pid)
    assert f"{12 - len(made)} done, {len(made)} finished before, 0 failed" in text, text
    _check_complete(tmp_path / "out", expected)  # the journal has each item done once: nothing redone


def test_without_ray_the_ray_engine_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    _scenes(tmp_path / "in", 2)
    path = _write_recipe(tmp_path, BASE)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, as where it is not installed
    assert main(["batch", str(path), "--ray"]) == 2
    assert main(["batch", "--ray", "10.0.0.5:6379", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: the Ray engine needs Ray, which is not installed; install it with: '
                   'pip install "editsuite[ray]"'] * 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="editsuite\\[ray\\]"):
        list(Batch(load_recipe(path), engine="ray").run())


@pytest.mark.parametrize("run, message", [
    ('engine = "spark"', "run.engine = 'spark' is not allowed: local or ray"),
    ('engine = "ray"\nworkers = 0', "run.workers = 0 is not allowed: an integer from 1 to 4096"),
    ('engine = "ray"\ngpus_per_worker = -1', "run.gpus_per_worker = -1 is not allowed"),
    ('engine = "ray"\naddress = 5', "run.address = 5 is not allowed"),
    ('workers = 2', 'run.workers = 2 is not allowed: only the Ray engine takes it; add engine = "ray" to [run]'),
    ('threads = 2', "run.threads = 2 is not allowed: [run] takes address, engine, gpus_per_worker, workers"),
])
def test_run_table_errors_name_key_value_and_what_is_allowed(tmp_path, run, message):
    _scenes(tmp_path / "in", 1)
    path = _write_recipe(tmp_path, BASE + "[run]\n" + run + "\n")
    with pytest.raises(UserError) as err:
        Batch(load_recipe(path))
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize("args, expected", [
    (["batch", "r.toml", "--ray"], ["batch", "r.toml", "--ray="]),
    (["batch", "--ray", "r.toml"], ["batch", "--ray=", "r.toml"]),
    (["batch", "--ray", "-q", "r.toml"], ["batch", "--ray=", "-q", "r.toml"]),
    (["batch", "r.toml", "--ray", "auto"], ["batch", "r.toml", "--ray", "auto"]),
    (["batch", "--ray", "10.0.0.5:6379", "r.toml"], ["batch", "--ray", "10.0.0.5:6379", "r.toml"]),
    (["batch", "--ray", "ray://head:10001", "r.toml"], ["batch", "--ray", "ray://head:10001", "r.toml"]),
    (["inpaint", "--ray"], ["inpaint", "--ray"]),
])
def test_ray_takes_an_optional_address(args, expected):
    assert _ray_flag(args) == expected
