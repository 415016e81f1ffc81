"""A recipe's items run on a Ray cluster: `editsuite batch RECIPE --ray [ADDRESS]`, or `[run] engine = "ray"`.

Ray does what it is built for here: starting or joining a cluster, placing a pool of model-holding workers
(actors) on its CPUs and GPUs, moving pictures between machines, and telling us when a worker or a node is gone.
What it does not give is this batch's bookkeeping, so the driver (the process running the batch) keeps it:

- Where things live. The driver owns every file: it reads and checks each input picture, sends the opened
  picture to a worker, gets the finished picture back and writes it (atomically) and its journal line itself,
  exactly as the local engine does. Outputs and the journal are therefore on the driver's machine, and a rerun
  of the same command resumes as after a local run; no storage has to be shared for pictures. Each worker loads
  the model itself: the recipe's `model` must be readable at the same path on every node (shared storage, or a
  copy at the same path; a hub id from each node's cache), and the built-in demo model comes with editsuite,
  which every node needs installed anyway.
- Nothing done twice, nothing lost. Only the driver writes, and it writes an item once, when its picture comes
  back. A worker that dies (its process killed, out of memory, its node lost) loses only the items it held; they
  go back to the queue and to another worker, and a new worker is started in its place. An item whose worker
  died RETRIES times is recorded as failed (it may be what kills them) and the batch goes on.
- Bad items are found by the driver (a corrupt picture, a mask of another size) or by the worker (the task's
  own checks) and recorded with their reason, as locally.
- The same pictures. A worker runs the same code on the same inputs and seed as the local engine; with the same
  thread count (Ray gives a CPU worker as many threads as it has CPUs, or OMP_NUM_THREADS where the user set
  it) the pictures are equal pixel for pixel.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

from editsuite.batch.recipe import Item, Recipe
from editsuite.batch.runner import Batch, ItemResult, load_model, make_picture, make_task, model_source, open_inputs
from editsuite.errors import UserError

INSTALL = 'the Ray engine needs Ray, which is not installed; install it with: pip install "editsuite[ray]"'
RETRIES = 3  # deaths of an item's worker before the item is recorded as failed
IN_FLIGHT = 2  # items queued on each worker, so that it never waits for the driver between two items
THREADS = 4  # CPU workers: threads (CPUs) each, fewer where a node has fewer; more workers beat more threads
POLL = 0.2  # seconds between looks at should_stop while waiting for pictures
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}
COMPUTE_MEMORY = 1 << 30  # a worker's memory beyond its weights (activations, the picture, the interpreter)
UNKNOWN_MODEL = 4 << 30  # the weights of a model not on this disk (a hub id): an SD 1.5 checkpoint's, in fp32
START_NOTICE, START_LIMIT = 60, 900  # seconds without any worker ready: say so; give up (one line, exit 2)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL) from None
    return ray


class WorkerUnusable(Exception):
    """This worker cannot make pictures (its node cannot load the model); the others may."""


class EditsuiteWorker:
    """A Ray actor: loads the model once, then makes the pictures of the items sent to it."""

    def __init__(self, recipe: Recipe, fingerprint: str):
        # threads: Ray sets OMP_NUM_THREADS to the worker's CPUs (or keeps the one the user set), which torch
        # follows and editsuite's thread governor leaves alone
        self.recipe, self.fingerprint = recipe, fingerprint
        self.task = self.unusable = None
        try:
            self.task = make_task(recipe, load_model(recipe))
        except UserError as e:  # reported by ready(): a node without the model is not a crash
            self.unusable = str(e)
        except Exception as e:  # noqa: BLE001 - out of memory, a broken file on this node: reported, not retried
            self.unusable = f"loading the model failed on this worker ({type(e).__name__}: {e})".splitlines()[0]

    def ready(self) -> int:
        """The model's VAE factor, once loaded (the driver checks the recipe's sizes against it)."""
        if self.unusable:
            raise WorkerUnusable(self.unusable)
        return self.task.bundle.manifest.vae_scale_factor

    def make(self, item: Item, inputs: tuple) -> tuple:
        """("done", picture, settings, seconds) or ("failed", reason, None, seconds); only sent once ready()
        answered."""
        t0 = time.time()
        try:
            image, settings = make_picture(self.recipe, self.fingerprint, self.task, item, inputs)
        except UserError as e:
            return "failed", str(e), None, time.time() - t0
        return "done", image, settings, time.time() - t0


def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray instance ("local" or none); True if this call started
    or joined it (and so shuts it down after), False where the caller's program had already connected."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address in (None, "local"):
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = "start a local Ray instance" if address in (None, "local") else f"join the Ray cluster at {address}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot {where} ({first}); check the address, or omit it to run a local instance") from None
    return True


def alive_nodes(ray) -> list[dict]:
    """The resources (CPU, GPU, memory) of each live node of the cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def layout(nodes: list[dict], workers: int | None, gpus_per_worker: float | None,
           memory_each: int) -> tuple[int, float, float]:
    """(workers, CPUs each, GPUs each) on `nodes` (alive_nodes): one worker per GPU where the cluster has GPUs,
    else CPU workers of THREADS threads (fewer on a smaller node) filling each node's CPUs, as many as its
    memory holds (`memory_each` bytes a worker); `workers` and `gpus_per_worker` override."""
    cpus, gpus = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
    if gpus_per_worker is None:
        gpus_per_worker = 1 if gpus >= 1 else 0
    if gpus_per_worker > 0:
        if gpus < gpus_per_worker:
            raise UserError(f"run.gpus_per_worker = {gpus_per_worker:g}, but the Ray cluster has {gpus:g} GPUs; "
                            "set it to 0 for CPU workers")
        fit = sum(int(n.get("GPU", 0) // gpus_per_worker) for n in nodes)
        if fit < 1:
            raise UserError(f"run.gpus_per_worker = {gpus_per_worker:g}, but no node of the Ray cluster has that many "
                            f"GPUs ({gpus:g} in all); ask for fewer")
        count = workers or fit
        if count > fit:
            raise UserError(f"run.workers = {count} with {gpus_per_worker:g} GPU each needs "
                            f"{count * gpus_per_worker:g} GPUs; the Ray cluster has {gpus:g}, room for {fit} such "
                            "workers on its nodes")
        return count, min(1, cpus / count), gpus_per_worker
    nodes = [n for n in nodes if n.get("CPU", 0) >= 1]
    if not nodes:
        raise UserError("the Ray cluster has no CPUs for workers")
    smallest = int(min(n["CPU"] for n in nodes))
    if workers is None:
        each = min(THREADS, smallest)
        fit = [int(n["CPU"] // each) if not memory_each else min(int(n["CPU"] // each),
                                                                 int(n.get("memory", 0) // memory_each))
               for n in nodes]
        return max(1, sum(fit)), each, 0
    if workers > int(cpus):
        raise UserError(f"run.workers = {workers}, but the Ray cluster has {cpus:g} CPUs; use at most {int(cpus)}")
    return workers, max(1, min(smallest, int(cpus // workers))), 0


def worker_memory(recipe: Recipe) -> int:
    """Bytes of memory to reserve for a worker: its model's weight files plus room to compute (Ray places no
    more workers on a node than its memory holds); UNKNOWN_MODEL's where the model is not on this disk."""
    source = model_source(recipe)
    path = Path(source) if source is not None else None
    if path is None or not path.exists():
        return UNKNOWN_MODEL + COMPUTE_MEMORY
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files) + COMPUTE_MEMORY


class _Pool:
    """The workers: those loading the model (each with its ready() call), those ready with the items they hold;
    a dead one is replaced, up to a limit."""

    def __init__(self, ray, batch: Batch, count: int, cpus: float, gpus: float, memory: int):
        self.ray = ray  # a request no node can meet would wait forever
        self.cls = ray.remote(EditsuiteWorker).options(num_cpus=cpus, num_gpus=gpus, memory=memory or None,
                                                       max_restarts=0)
        recipe = batch.recipe
        if recipe.model and Path(recipe.model).exists():  # workers on other nodes: not relative to our folder
            recipe = dataclasses.replace(recipe, model=str(Path(recipe.model).resolve()))
        self.args = (recipe, batch.fingerprint)
        self.loading: dict = {}  # ready() ref -> worker
        self.held: dict = {}  # ready worker -> its in-flight refs, oldest (running) first
        self.replacements = 2 * count + 2
        self.last_loss = ""
        for _ in range(count):
            self.start()

    def start(self) -> None:
        worker = self.cls.remote(*self.args)
        self.loading[worker.ready.remote()] = worker

    def replace(self, worker) -> bool:
        """Drop a dead worker and start another in its place, if the limit allows."""
        self.drop(worker)
        if self.replacements <= 0:
            return False
        self.replacements -= 1
        self.start()
        return True

    def drop(self, worker) -> None:
        self.held.pop(worker, None)
        try:
            self.ray.kill(worker, no_restart=True)
        except Exception:  # already gone
            pass

    def free(self):
        """A ready worker with room for another item, the least busy first, or None."""
        worker = min(self.held, key=lambda w: len(self.held[w]), default=None)
        return worker if worker is not None and len(self.held[worker]) < IN_FLIGHT else None

    def close(self) -> None:
        for worker in list(self.held) + list(self.loading.values()):
            self.drop(worker)


def run_on_ray(batch: Batch, todo: list[Item], should_stop: Callable[[], bool],
               notice: Callable[[str], None]) -> Iterator[ItemResult]:
    ray = import_ray()
    settings = batch.settings
    joined = connect(ray, settings.address)
    pool = None
    try:
        nodes = alive_nodes(ray)
        memory = worker_memory(batch.recipe)
        count, cpus, gpus = layout(nodes, settings.workers, settings.gpus_per_worker, memory)
        # a memory request no node can meet would wait forever
        memory = min(memory, int(max((n.get("memory", 0) for n in nodes), default=0)))
        count = min(count, len(todo))
        what = f"{gpus:g} GPU" if gpus else f"{cpus:g} CPU"
        notice(f"ray: {count} worker{'s' * (count != 1)} ({what} each) on {len(nodes)} node(s); outputs and the "
               "journal are written here")
        if should_stop():
            return
        pool = _Pool(ray, batch, count, cpus, gpus, memory)
        yield from _drive(ray, pool, batch, todo, should_stop, notice)
    finally:
        if pool is not None:
            pool.close()
        if joined:
            ray.shutdown()


def _drive(ray, pool: _Pool, batch: Batch, todo: list[Item], should_stop, notice) -> Iterator[ItemResult]:
    """Items to ready workers (IN_FLIGHT each), pictures back to disk, lost workers' items to others. No item
    goes out before a worker has loaded the model and the parameters are checked against it."""
    queue = collections.deque(todo)
    deaths: collections.Counter = collections.Counter()
    flying: dict = {}  # ref -> (worker, item)
    checked, problems, since, told = False, [], time.time(), False
    while queue or flying:
        if should_stop():
            return
        if pool.held:
            since = time.time()
        elif time.time() - since > START_NOTICE and not told:
            told = True
            notice(f"ray: no worker has started in {START_NOTICE} s; the cluster may be busy, or have no node with "
                   "the CPUs, GPUs and memory one worker asks for (set run.workers, run.gpus_per_worker)")
        elif time.time() - since > START_LIMIT:
            raise UserError(f"no Ray worker started in {START_LIMIT // 60} minutes: the cluster has no room for one "
                            "(its CPUs, GPUs or memory); set run.workers or run.gpus_per_worker, or free the "
                            "cluster, then run the same command again")
        while checked and queue and (worker := pool.free()) is not None:
            item = queue.popleft()
            try:
                inputs = open_inputs(batch.recipe, item)
            except UserError as e:  # refused here, before any worker: not part of the pace
                yield batch.failed(item, str(e))
                continue
            ref = worker.make.remote(item, inputs)
            pool.held[worker].append(ref)
            flying[ref] = (worker, item)
        if not pool.held and not pool.loading:
            if problems:
                raise UserError(problems[-1])
            raise UserError(f"every Ray worker was lost (the last: {pool.last_loss}); {len(queue) + len(flying)} "
                            "items are left for a rerun of the same command")
        if not flying and not pool.loading:
            continue
        ready, _ = ray.wait(list(flying) + list(pool.loading), num_returns=1, timeout=POLL)
        for ref in ready:
            if ref in pool.loading:  # a worker has loaded the model, or could not
                worker = pool.loading.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    if not isinstance(e.cause, WorkerUnusable):
                        raise e.cause from None  # a bug in editsuite: as loud as in the local engine
                    problems.append(str(e.cause))
                    notice(f"ray: a worker cannot work: {e.cause}")
                    pool.drop(worker)
                    continue
                except ray.exceptions.RayError as e:
                    if getattr(e, "actor_init_failed", False):  # e.g. editsuite cannot be imported on its node
                        first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                        problems.append(f"a Ray worker could not start: {first}")
                        notice(f"ray: {problems[-1]}")
                        pool.drop(worker)
                        continue
                    pool.last_loss = f"a worker was lost while loading the model ({type(e).__name__})"
                    pool.replace(worker)  # died while loading: another takes its place
                    continue
                if not checked:
                    batch.check_params(info)
                    checked = True
                pool.held[worker] = []
                continue
            worker, item = flying.pop(ref)
            try:
                status, value, picture_settings, seconds = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise e.cause from None
            except ray.exceptions.RayError as e:  # the worker died: killed, out of memory, its node lost
                if should_stop():
                    return
                for lost in _lost(pool, flying, worker, ref, item, queue, deaths, notice,
                                  f"a worker was lost ({type(e).__name__})"):
                    yield batch.failed(lost, f"its Ray worker died {RETRIES} times while making it (killed, out of "
                                             "memory, or its node lost)")
                continue
            if ref in pool.held.get(worker, ()):
                pool.held[worker].remove(ref)
            if status == "failed":
                yield batch.failed(item, value, seconds)
            else:
                yield batch.save(value, picture_settings, item, seconds)


def _lost(pool: _Pool, flying: dict, worker, ref, item: Item, queue, deaths, notice, why: str) -> list[Item]:
    """A worker is gone: its items go back to the front of the queue, and another worker takes its place.
    Ray runs a worker's calls one after another, so only the oldest was running when it died: that item is
    charged with the death, and returned (to be recorded as failed) at its RETRIES-th; the others never ran."""
    refs = list(pool.held.get(worker, ())) or [ref]
    items = [item if r == ref else flying.pop(r)[1] for r in refs if r == ref or r in flying]
    failed = []
    for n, it in reversed(list(enumerate(items))):
        if n == 0:
            deaths[it.key] += 1
            if deaths[it.key] >= RETRIES:
                failed.append(it)
                continue
        queue.appendleft(it)
    pool.last_loss = why
    started = pool.replace(worker)
    notice(f"ray: {why}; {len(items) - len(failed)} item(s) go to another worker"
           + ("; a new worker is starting" if started else ""))
    return failed
