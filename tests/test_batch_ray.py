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

import pytest
import torch

from editsuite.batch import Batch, Item, load_recipe
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
    (tmp_path / "broken-model").mkdir()
    broken = dataclasses.replace(load_recipe(path), model=str(tmp_path / "broken-model"),
                                 folder=tmp_path / "broken-out")
    with pytest.raises(UserError) as local_error:
        list(Batch(broken, engine="local").run())
    notices = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        results = list(Batch(load_recipe(path)).run(on_notice=notices.append))  # [run] engine = "ray"
        with pytest.raises(UserError) as ray_error:  # a model no worker can load: the local engine's one line
            list(Batch(broken).run())
    finally:
        ray.shutdown()
    assert str(ray_error.value) == str(local_error.value)
    assert not list((tmp_path / "broken-out").glob("*.png"))
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


@pytest.mark.slow  # the resume after a driver's SIGKILL is the local runner's (test_batch.py kills it 20 times)
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
    ('engine = "ray"\ngpus_per_worker = 1.5', "run.gpus_per_worker = 1.5 is not allowed: 0 (CPU workers), a fraction"),
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


GIB = 1 << 30


@pytest.mark.parametrize("nodes, workers, gpus, memory_each, expected", [
    ([dict(CPU=2, memory=16 * GIB)], None, None, GIB, (1, 2, 0)),  # this machine: one worker, two threads
    ([dict(CPU=16, memory=64 * GIB)], None, None, GIB, (4, 4, 0)),  # four threads a worker
    ([dict(CPU=16, memory=12 * GIB)], None, None, 5 * GIB, (2, 4, 0)),  # as many as the memory holds
    ([dict(CPU=16, memory=12 * GIB)], None, None, 0, (4, 4, 0)),  # a hub id: memory unknown
    ([dict(CPU=8, memory=GIB), dict(CPU=3, memory=GIB)], None, None, 0, (3, 3, 0)),  # the smaller node's size
    ([dict(CPU=2, memory=16 * GIB)], 2, None, GIB, (2, 1, 0)),
    ([dict(CPU=16, GPU=2, memory=64 * GIB)], None, None, GIB, (2, 1, 1)),  # one worker per GPU
    ([dict(CPU=16, GPU=2, memory=64 * GIB)], None, 0.5, GIB, (4, 1, 0.5)),
    ([dict(CPU=16, GPU=2, memory=64 * GIB)], None, 0, GIB, (4, 4, 0)),  # GPUs left alone
])
def test_workers_default_to_what_the_cluster_offers(nodes, workers, gpus, memory_each, expected):
    from editsuite.batch.ray_engine import layout

    assert layout(nodes, workers, gpus, memory_each) == expected


@pytest.mark.parametrize("nodes, workers, gpus, message", [
    ([dict(CPU=2)], 3, None, "run.workers = 3, but the Ray cluster has 2 CPUs; use at most 2"),
    ([dict(CPU=2)], None, 1, "run.gpus_per_worker = 1, but the Ray cluster has 0 GPUs; set it to 0"),
    ([dict(CPU=8, GPU=2)], 3, None, "run.workers = 3 with 1 GPU each needs 3 GPUs; the Ray cluster has 2"),
    ([dict(CPU=8, GPU=1), dict(CPU=8, GPU=1)], None, 2, "run.gpus_per_worker = 2, but no node of the Ray cluster has that many GPUs (2 in all)"),
    ([dict(GPU=0)], None, None, "the Ray cluster has no CPUs for workers"),
])
def test_a_layout_the_cluster_cannot_hold_is_one_line(nodes, workers, gpus, message):
    from editsuite.batch.ray_engine import layout

    with pytest.raises(UserError, match=re.escape(message)):
        layout(nodes, workers, gpus, 0)


def test_only_the_running_item_is_charged_with_a_death_and_fails_at_the_third():
    """Ray runs a worker's calls in order: of the items a dead worker held, only the oldest was running."""
    from editsuite.batch import ray_engine

    class Pool:
        def __init__(self):
            self.held, self.replaced, self.last_loss = {"w": ["r1", "r2"]}, 0, ""

        def replace(self, worker):
            self.held.pop(worker)
            self.replaced += 1
            return True

    def item(key):
        return Item(key, 0, None, None, key, 0, Path(key + ".png"))

    a, b, c = item("a"), item("b"), item("c")
    for deaths_before, failed_expected, queue_expected in ((0, [], ["a", "b", "c"]),
                                                           (ray_engine.RETRIES - 1, ["a"], ["b", "c"])):
        queue, notices = ray_engine.collections.deque([c]), []
        deaths = ray_engine.collections.Counter({"a": deaths_before})
        pool, flying = Pool(), {"r1": ("w", a)}  # r2 (item b, queued behind a) is the error ray.wait gave
        failed = ray_engine._lost(pool, flying, "w", "r2", b, queue, deaths, notices.append, "a worker was lost (X)")
        assert [i.key for i in failed] == failed_expected and [i.key for i in queue] == queue_expected
        assert deaths["a"] == deaths_before + 1 and deaths["b"] == 0 and not flying and pool.replaced == 1
        assert notices == [f"ray: a worker was lost (X); {2 - len(failed)} item(s) go to another worker; a new "
                           "worker is starting"]
