"""The studio's server: a Starlette app over the task classes, one edit at a time from a queue.

Data flows as everywhere else: request -> the task's own checks (params.Param, imaging.io) -> task -> shared
loop -> model bundle. The page (static/) holds no rules of its own: it builds its forms from
`editsuite.tasks.describe()` and shows the messages the server sends, which are the CLI's one-liners.

Safety (the studio runs on a user's own machine, next to their browser):
- it listens on 127.0.0.1 unless told otherwise (`editsuite serve` warns about any other host);
- a state-changing request whose Origin is not the studio's own is refused (a page on another site cannot
  make the user's browser start edits, cancel them or upload files), and so is one whose Host is foreign
  (DNS rebinding);
- uploads are bounded in bytes (`max_upload_bytes`) and pixels (`max_pixels`, imaging.io's check before
  decoding), and land in a private temporary folder under names chosen here;
- outputs are named here (imaging.output.output_paths, never from the client), written atomically, and
  only files of the output folder are served.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from editsuite.errors import UserError
from editsuite.imaging.output import DEFAULT_MAX_OUTPUT_PIXELS

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a 50 MP PNG is about this; the pixel limit is the finer check
PARAMS_FIELD_BYTES = 64 * 1024


@dataclasses.dataclass
class Job:
    """One edit asked for by the page: its checked values and inputs, and where it stands."""

    id: str
    task: type
    values: dict[str, Any]
    inputs: list  # PIL images: [image] or [image, mask] or []
    state: str = "queued"  # queued, running, done, failed, cancelled
    step: int = 0
    total: int = 0
    error: str | None = None
    results: list[dict] = dataclasses.field(default_factory=list)
    preview: bytes | None = None
    preview_version: int = 0
    cancel: bool = False
    preview_cost: float = 0.0
    preview_at: float = 0.0

    def view(self, position: int | None) -> dict[str, Any]:
        return {"id": self.id, "task": self.task.name, "state": self.state, "position": position,
                "step": self.step, "total": self.total, "error": self.error, "results": self.results,
                "preview": self.preview_version if self.preview is not None else None}


class Studio:
    """The studio's state: models (each loaded once), the job queue and its one worker, the output folder.

    `model`: a model path for every edit it can do, or None for the built-in demo family (each member loaded
    the first time an edit needs it). `load` is `editsuite.bundle.loader.load_bundle` (a test may pass its own).
    """

    def __init__(self, output: Path, *, model: str | None = None, load: Callable | None = None,
                 max_pixels: int | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES, load_options=None):
        from editsuite.imaging.io import DEFAULT_MAX_PIXELS
        from editsuite.imaging.output import check_writable

        self.output = Path(output)
        check_writable(self.output)
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot use {self.output} as the output folder ({e.strerror}); pass another --output") \
                from None
        self.model = model
        self.load_options = dict(load_options or {})
        if load is None:
            from editsuite.bundle.loader import load_bundle as load
        self._load = load
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.max_upload_bytes = max_upload_bytes
        self.bundles: dict[Any, Any] = {}
        self.jobs: dict[str, Job] = {}
        self.pending: collections.deque[Job] = collections.deque()
        self.lock = threading.Lock()
        self.wake = queue.Queue()
        self.ids = itertools.count(1)
        if model is not None:  # a given model loads now, once; a bad one stops `serve` before it listens
            self._bundle(None)
        else:
            from editsuite.bundle.manifest import ModelKind
            from editsuite.demo import NOT_INSTALLED, demo_model

            if demo_model(ModelKind.BASE) is None:
                raise UserError(NOT_INSTALLED)
        self.uploads = Path(tempfile.mkdtemp(prefix="editsuite-studio-"))
        self.worker = threading.Thread(target=self._work, name="editsuite-studio", daemon=True)
        self.worker.start()

    # -- what the page asks ------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The edits this studio offers (the tasks' own descriptions) and the model behind them."""
        from editsuite.tasks import TASKS

        tasks = []
        for task in TASKS.values():
            if self.model is not None and self._bundle(None).kind not in task.kinds:
                continue
            tasks.append(task.describe())
        name = "the built-in demo family" if self.model is None else str(self.model)
        return {"model": name, "tasks": tasks, "max_pixels": self.max_pixels,
                "max_upload_bytes": self.max_upload_bytes}

    def submit(self, task_name: str, params: dict, image: bytes | None, mask: bytes | None) -> Job:
        """Check everything the CLI checks before a run (the values, the pictures, the mask against the
        picture), then queue the edit. Raises UserError with the CLI's message."""
        from editsuite.imaging.io import open_image, open_mask
        from editsuite.tasks import TASKS
        from editsuite.tasks.params import random_seed

        task = TASKS.get(task_name)
        if task is None:
            raise UserError(f"unknown edit {task_name!r}; use one of: {', '.join(TASKS)}")
        if not isinstance(params, dict):
            raise UserError("the parameters must be a JSON object")
        if self.model is not None:  # the task's own check that the model suits it
            task(self._bundle(None), max_output_pixels=DEFAULT_MAX_OUTPUT_PIXELS)
        values = task.validate(params)
        if values["seed"] is None:
            values["seed"] = random_seed()
        inputs = []
        if task.inputs:
            if image is None:
                raise UserError(f"{task.name} needs a picture: open or drop one first")
            inputs.append(self._picture(image, "image", lambda p: open_image(p, max_pixels=self.max_pixels)))
        if "mask" in task.inputs:
            if mask is None:
                raise UserError("inpaint needs a mask: paint over the part to repaint")
            inputs.append(self._picture(mask, "mask", lambda p: open_mask(p, max_pixels=self.max_pixels)))
        task.check_inputs(values, inputs[:1], inputs[1] if len(inputs) > 1 else None, DEFAULT_MAX_OUTPUT_PIXELS)
        job = Job(id=str(next(self.ids)), task=task, values=values, inputs=inputs)
        with self.lock:
            self.jobs[job.id] = job
            self.pending.append(job)
        self.wake.put(None)
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            position = next((i for i, j in enumerate(self.pending) if j is job), None)
            return job.view(None if position is None else position + 1)

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            job.cancel = True
            if job in self.pending:
                self.pending.remove(job)
                job.state = "cancelled"
        return self.status(job_id)

    def results(self) -> list[dict[str, Any]]:
        """The output folder's pictures that carry editsuite settings, newest first (they outlive restarts)."""
        from editsuite.imaging.metadata import read_settings

        found = []
        for path in sorted(self.output.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True):
            if path.name.startswith("."):  # save_atomic's temporary files
                continue
            try:
                settings = read_settings(path)
            except UserError:
                continue
            found.append({"name": path.name, "url": f"/outputs/{path.name}", "settings": settings})
        return found

    def output_file(self, name: str) -> Path | None:
        """The output folder's file `name`, or None: only a plain name of a PNG that is there."""
        if not name or "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".png"):
            return None
        path = self.output / name
        return path if path.is_file() and path.parent == self.output else None

    def close(self) -> None:
        """Cancel what waits and what runs (the running edit stops after its current step, writing nothing),
        then stop the worker."""
        with self.lock:
            for job in self.pending:
                job.cancel, job.state = True, "cancelled"
            self.pending.clear()
            for job in self.jobs.values():
                job.cancel = True
        self.wake.put(StopIteration)
        self.worker.join(timeout=60)
        shutil.rmtree(self.uploads, ignore_errors=True)

    # -- inside ---------------------------------------------------------------------------------------------

    def _picture(self, data: bytes, what: str, opener):
        """An upload opened with the CLI's checks (type, size in pixels before decoding): written to the
        private temporary folder under a name chosen here, opened, removed. Messages name "the uploaded
        image" (or mask), not the temporary file."""
        folder = Path(tempfile.mkdtemp(dir=self.uploads))
        path = folder / f"uploaded-{what}"
        try:
            path.write_bytes(data)
            try:
                im = opener(path)
            except UserError as e:
                raise UserError(str(e).replace(f"{what} '{path}'", f"the uploaded {what}")
                                .replace(str(path), f"the uploaded {what}")) from None
            im.load()
            return im
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _bundle(self, task):
        """The model an edit runs on: the given one, or the demo member the CLI would use for it."""
        if self.model is not None:
            key, source = None, self.model
        else:
            from editsuite.demo import NOT_INSTALLED, TASK_KIND, demo_model

            key = TASK_KIND[task.name]
            source = demo_model(key)
            if source is None:
                raise UserError(NOT_INSTALLED)
        with self.lock:
            bundle = self.bundles.get(key)
        if bundle is None:
            bundle = self._load(source, **self.load_options)
            with self.lock:
                self.bundles[key] = bundle
        return bundle

    def _work(self) -> None:
        while True:
            item = self.wake.get()
            if item is StopIteration:
                return
            while True:
                with self.lock:
                    if not self.pending:
                        break
                    job = self.pending.popleft()
                    job.state = "running"
                self._run(job)

    def _run(self, job: Job) -> None:
        from editsuite.core.loop import Cancelled
        from editsuite.imaging.metadata import png_info, png_settings
        from editsuite.imaging.output import output_paths, save_atomic

        try:
            bundle = self._bundle(job.task)
            runner = job.task(bundle, max_output_pixels=DEFAULT_MAX_OUTPUT_PIXELS)
            result = runner.run(*job.inputs, **job.values, callback=lambda s: self._step(job, bundle, s))
            n, seed = len(result.images), job.values["seed"]
            outs = output_paths(self.output, task=job.task.name, seeds=[seed + j for j in range(n)], inputs=None,
                                n_per_input=n, overwrite=False)
            saved = []
            for j, (image, out) in enumerate(zip(result.images, outs)):
                settings = result.image_settings(j)
                path = save_atomic(image, out, pnginfo=png_info(png_settings(settings)))
                saved.append({"name": path.name, "url": f"/outputs/{path.name}", "settings": settings})
            with self.lock:
                job.results, job.state = saved, "done"
        except Cancelled:
            with self.lock:
                job.state = "cancelled"
        except UserError as e:
            with self.lock:
                job.state, job.error = "failed", str(e)
        except Exception as e:  # the studio keeps serving; the page shows one line
            with self.lock:
                job.state = "failed"
                job.error = f"the edit failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        finally:
            job.inputs, job.preview = [], None

    def _step(self, job: Job, bundle, step) -> bool:
        """Progress for the page; a preview when decoding one costs at most a quarter of the time since the
        last (a full VAE decode: cheap for the demo model, seconds for SD at 512 px, so rarer there)."""
        from editsuite.core.loop import preview

        job.step, job.total = step.index + 1, step.total
        if job.cancel:
            return False
        now = time.monotonic()
        if step.index + 1 < step.total and now - job.preview_at >= 4 * job.preview_cost:
            try:
                picture = preview(bundle, step.latents[:1])[0]
            except Exception:  # e.g. an fp16 VAE overflowing on a noisy latent: no more previews, the run goes on
                job.preview_cost = float("inf")
                return not job.cancel
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            job.preview, job.preview_version = buf.getvalue(), job.preview_version + 1
            job.preview_cost, job.preview_at = time.monotonic() - now, time.monotonic()
        return not job.cancel


# -- the web app ------------------------------------------------------------------------------------------

def create_app(studio: Studio, hosts: tuple[str, ...] = ()):
    """The Starlette app: the page, its JSON API, and the output folder's pictures. `hosts`: names the
    studio answers to besides the loopback ones ("*": any, for `--host 0.0.0.0`)."""
    import json

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def refused(message: str, code: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=code)

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def describe(request: Request):
        return JSONResponse(await run_in_threadpool(studio.describe))

    async def submit(request: Request):
        # the body is bounded before it is parsed: its declared length (browsers and HTTP clients send one),
        # then each part (the fields by Starlette's parser, the pictures by _read)
        length = request.headers.get("content-length")
        if length is None:
            return refused("the upload must say its length (Content-Length)", 411)
        if not length.isdigit() or int(length) > studio.max_upload_bytes * 2 + PARAMS_FIELD_BYTES:
            return refused(f"the upload is too large (at most {_amount(studio.max_upload_bytes)} a picture)", 413)
        try:
            form = await request.form(max_files=2, max_fields=2, max_part_size=PARAMS_FIELD_BYTES)
        except Exception as e:  # starlette's MultiPartException and the like: malformed or too large
            return refused(f"the upload could not be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        try:
            raw = form.get("params")
            if raw is not None and not isinstance(raw, str):
                return refused("the parameters must be a JSON text field")
            try:
                params = json.loads(raw or "{}")
            except ValueError:
                return refused("the parameters are not valid JSON")
            image, mask = [await _read(form.get(k), studio.max_upload_bytes) for k in ("image", "mask")]
            job = await run_in_threadpool(studio.submit, str(form.get("task") or ""), params, image, mask)
        except UserError as e:
            return refused(str(e))
        finally:
            await form.close()
        return JSONResponse(studio.status(job.id), status_code=202)

    async def status(request: Request):
        try:
            return JSONResponse(studio.status(request.path_params["job"]))
        except KeyError:
            return refused("no such job", 404)

    async def cancel(request: Request):
        try:
            return JSONResponse(studio.cancel(request.path_params["job"]))
        except KeyError:
            return refused("no such job", 404)

    async def job_preview(request: Request):
        job = studio.jobs.get(request.path_params["job"])
        if job is None or job.preview is None:
            return refused("no preview", 404)
        return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def results(request: Request):
        return JSONResponse(await run_in_threadpool(studio.results))

    async def output(request: Request):
        path = studio.output_file(request.path_params["name"])
        if path is None:
            return refused("no such picture", 404)
        return FileResponse(path, media_type="image/png", filename=path.name)

    app = Starlette(routes=[
        Route("/", index),
        Route("/api/tasks", describe),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job}", status),
        Route("/api/jobs/{job}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job}/preview", job_preview),
        Route("/api/results", results),
        Route("/outputs/{name}", output),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    return SameOrigin(app, hosts)


async def _read(part, limit: int) -> bytes | None:
    if part is None or isinstance(part, str):
        return None
    if part.size is not None and part.size > limit:
        raise UserError(f"the upload is too large (at most {_amount(limit)} a picture)")
    data = await part.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"the upload is too large (at most {_amount(limit)} a picture)")
    return data or None


def _amount(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n:,} bytes"


class SameOrigin:
    """ASGI middleware: refuses a request with a foreign Host (DNS rebinding), and a state-changing one (not
    GET/HEAD) whose Origin is not this server's own. A browser always sends Origin with a cross-site POST;
    tools like curl send none and are let through, as they could open the port anyway."""

    LOCAL = ("127.0.0.1", "localhost", "::1", "[::1]")

    def __init__(self, app, hosts: tuple[str, ...] = ()):
        self.app = app
        self.hosts = set(self.LOCAL) | set(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            try:
                name = urlsplit(f"//{host}").hostname or ""
            except ValueError:  # a malformed Host
                name = ""
            problem = None
            if "*" not in self.hosts and name not in self.hosts and f"[{name}]" not in self.hosts:
                problem = f"this studio does not answer to the host {host!r}"
            elif scope["method"] not in ("GET", "HEAD"):
                origin = headers.get("origin")
                try:
                    foreign = origin is not None and urlsplit(origin).netloc != host
                except ValueError:
                    foreign = True
                if foreign:
                    problem = "refused: this request comes from another site (Origin " + repr(origin) + ")"
            if problem is not None:
                from starlette.responses import JSONResponse

                return await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)
