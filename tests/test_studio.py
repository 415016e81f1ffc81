"""`editsuite serve`: the studio's API (Starlette's TestClient) and its page in a real browser (Debian's chromium
driven by Playwright), on the built-in demo models."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import PIL.Image
import pytest

from editsuite.errors import UserError
from editsuite.imaging.metadata import read_settings
from editsuite.studio.server import Studio, create_app
from editsuite.tasks import TASKS, describe

ORIGIN = "http://127.0.0.1:7860"


def png(im: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def studio(tmp_path):
    s = Studio(tmp_path / "out")
    yield s
    s.close()


@pytest.fixture
def client(studio):
    from starlette.testclient import TestClient

    return TestClient(create_app(studio), base_url="http://127.0.0.1:7860")


def post_job(client, task, params, image=None, mask=None, origin=ORIGIN):
    files = {}
    if image is not None:
        files["image"] = ("image.png", image, "image/png")
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return client.post("/api/jobs", data={"task": task, "params": json.dumps(params)}, files=files or None,
                       headers={"Origin": origin} if origin else {})


def wait(client, job_id, until=("done", "failed", "cancelled"), timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = client.get(f"/api/jobs/{job_id}").json()
        if got["state"] in until:
            return got
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {got['state']}")


def test_the_page_gets_the_tasks_own_descriptions(client):
    got = client.get("/api/tasks").json()
    assert got["tasks"] == json.loads(json.dumps(describe()))
    page = client.get("/")
    assert page.status_code == 200 and "studio.js" in page.text
    assert client.get("/static/studio.js").status_code == 200


def test_an_inpaint_run_writes_the_clis_png_and_keeps_pixels_outside_the_mask(client, photo, mask):
    r = post_job(client, "inpaint", {"prompt": "a red circle", "steps": 3, "seed": 5}, png(photo), png(mask))
    assert r.status_code == 202, r.text
    done = wait(client, r.json()["id"])
    assert done["state"] == "done", done
    [result] = done["results"]
    body = client.get(result["url"])
    assert body.status_code == 200
    out = PIL.Image.open(io.BytesIO(body.content))
    assert json.loads(out.info["editsuite"])["prompt"] == "a red circle"
    keep = np.asarray(mask.convert("L")) == 0
    assert np.array_equal(np.asarray(out.convert("RGB"))[keep], np.asarray(photo.convert("RGB"))[keep])
    listed = client.get("/api/results").json()
    assert [r["name"] for r in listed] == [result["name"]]


def test_bad_input_is_the_clis_one_line_and_the_next_run_works(client, photo):
    with pytest.raises(UserError) as cli:
        TASKS["img2img"].validate({"strength": 2})
    r = post_job(client, "img2img", {"prompt": "x", "strength": 2}, png(photo))
    assert r.status_code == 400 and r.json()["error"] == str(cli.value)
    r = post_job(client, "img2img", {"prompt": "x"}, b"this is not a picture")
    assert r.status_code == 400
    assert "uploaded image" in r.json()["error"] and "tmp" not in r.json()["error"]
    assert "\n" not in r.json()["error"]
    r = post_job(client, "inpaint", {"prompt": "x"}, png(photo), png(PIL.Image.new("L", (16, 16), 255)))
    assert r.status_code == 400 and "mask" in r.json()["error"]
    r = post_job(client, "img2img", {"prompt": "x", "steps": 2, "strength": 0.5, "seed": 1}, png(photo))
    assert r.status_code == 202 and wait(client, r.json()["id"])["state"] == "done"


def test_foreign_origins_and_hosts_are_refused(client, studio, photo):
    r = post_job(client, "txt2img", {"prompt": "x", "steps": 1}, origin="http://evil.example")
    assert r.status_code == 403 and "another site" in r.json()["error"]
    assert client.get("/api/tasks", headers={"Host": "evil.example:7860"}).status_code == 403
    assert not studio.jobs  # nothing was queued
    assert client.post("/api/jobs/1/cancel", headers={"Origin": "null"}).status_code == 403


def test_another_host_answers_any_name_but_still_checks_origins(studio):
    from starlette.testclient import TestClient

    c = TestClient(create_app(studio, ("*",)), base_url="http://192.0.2.7:7860")  # `--host 0.0.0.0`
    assert c.get("/api/tasks").status_code == 200
    r = c.post("/api/jobs", data={"task": "txt2img"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and not studio.jobs


def test_uploads_are_bounded_and_only_outputs_are_served(tmp_path, photo):
    from starlette.testclient import TestClient

    small = Studio(tmp_path / "o", max_pixels=32 * 32, max_upload_bytes=20_000)
    try:
        c = TestClient(create_app(small), base_url="http://127.0.0.1:7860")
        r = post_job(c, "img2img", {"prompt": "x"}, png(photo))
        assert r.status_code == 400 and "pixels" in r.json()["error"]
        noise = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
        r = post_job(c, "img2img", {"prompt": "x"}, png(noise))
        assert r.status_code in (400, 413) and "too large" in r.json()["error"]
        (tmp_path / "secret.png").write_bytes(png(photo))
        (tmp_path / "o" / ".hidden.png").write_bytes(png(photo))
        (tmp_path / "o" / "kept.png").write_bytes(png(photo))
        for name in ("../secret.png", "..\\secret.png", ".hidden.png", "nothing.png", "", "kept.txt"):
            assert small.output_file(name) is None
        assert small.output_file("kept.png") == tmp_path / "o" / "kept.png"
        for name in ("..%2Fsecret.png", "%2E%2E%2Fsecret.png", ".hidden.png"):
            assert c.get(f"/outputs/{name}").status_code == 404
        assert c.get("/outputs/kept.png").content == png(photo)
    finally:
        small.close()


def test_one_edit_at_a_time_the_queue_shows_positions_and_cancel_stops_a_run(client, studio, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    original = Studio._step

    def held(self, job, bundle, step):  # the first job waits at its first step until the test lets it go
        if job.id == "1":
            entered.set()
            gate.wait(30)
        return original(self, job, bundle, step)

    monkeypatch.setattr(Studio, "_step", held)
    first = post_job(client, "txt2img", {"prompt": "a", "steps": 50}).json()
    assert entered.wait(60)
    second = post_job(client, "txt2img", {"prompt": "b", "steps": 2}).json()
    third = post_job(client, "txt2img", {"prompt": "c", "steps": 2}).json()
    assert client.get(f"/api/jobs/{first['id']}").json()["state"] == "running"
    assert (second["state"], second["position"], third["position"]) == ("queued", 1, 2)
    assert client.post(f"/api/jobs/{third['id']}/cancel", headers={"Origin": ORIGIN}).json()["state"] == "cancelled"
    client.post(f"/api/jobs/{first['id']}/cancel", headers={"Origin": ORIGIN})
    gate.set()
    assert wait(client, first["id"])["state"] == "cancelled"
    assert wait(client, second["id"])["state"] == "done"
    assert [r["settings"]["prompt"] for r in client.get("/api/results").json()] == ["b"]  # nothing of a or c


def test_results_are_listed_after_a_restart(tmp_path, photo):
    first = Studio(tmp_path / "out")
    job = first.submit("img2img", {"prompt": "kept", "steps": 2, "strength": 0.5, "seed": 3}, png(photo), None)
    end = time.monotonic() + 120
    while first.status(job.id)["state"] != "done" and time.monotonic() < end:
        time.sleep(0.05)
    first.close()
    again = Studio(tmp_path / "out")
    try:
        assert [r["settings"]["prompt"] for r in again.results()] == ["kept"]
        assert read_settings(tmp_path / "out" / again.results()[0]["name"])["seed"] == 3
    finally:
        again.close()


def test_serve_refuses_a_port_in_use_in_one_line():
    from editsuite.cli.app import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        from editsuite.studio.serve import bind

        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
        assert main(["serve", "--port", str(port)]) == 2


# -- the page in a real browser ---------------------------------------------------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def served(tmp_path):
    """The studio on a free port in this process (uvicorn in a thread), and its URL."""
    import uvicorn

    from editsuite.studio.serve import bind

    sock = bind("127.0.0.1", 0)
    studio = Studio(tmp_path / "out", max_pixels=160 * 160)
    server = uvicorn.Server(uvicorn.Config(create_app(studio), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started and time.monotonic() < end:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", studio, tmp_path
    server.should_exit = True
    thread.join(10)
    studio.close()
    sock.close()


@pytest.fixture
def page(served):
    from playwright.sync_api import sync_playwright

    if _chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg.goto(served[0])
        pg.wait_for_selector("body[data-ready='1']")
        yield pg
        browser.close()


def _paint(page, points):
    box = page.locator("#mask").bounding_box()
    x0, y0 = box["x"], box["y"]
    page.mouse.move(x0 + points[0][0] * box["width"], y0 + points[0][1] * box["height"])
    page.mouse.down()
    for fx, fy in points[1:]:
        page.mouse.move(x0 + fx * box["width"], y0 + fy * box["height"], steps=5)
    page.mouse.up()


def _painted_mask(page) -> np.ndarray:
    url = page.evaluate("""() => maskPng().then(b => new Promise(done => {
        const r = new FileReader(); r.onload = () => done(r.result); r.readAsDataURL(b); }))""")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("L"))


def test_the_page_paints_a_mask_runs_inpaint_and_downloads_the_png(page, served, photo, tmp_path):
    from playwright.sync_api import expect

    picture = tmp_path / "photo.png"
    photo.save(picture)
    page.set_input_files("#file", str(picture))
    page.wait_for_selector("#stage:not(.empty)")
    _paint(page, [(0.3, 0.3), (0.6, 0.35), (0.65, 0.6), (0.35, 0.65)])
    painted = _painted_mask(page)
    assert painted.shape == (photo.height, photo.width) and 0 < (painted > 0).mean() < 0.6
    # the mask tools: invert flips it, undo takes that back, the eraser takes paint away, undo again
    page.click("#invert")
    assert np.array_equal(_painted_mask(page), 255 - painted)
    page.click("#undo")
    assert np.array_equal(_painted_mask(page), painted)
    page.check("#eraser")
    _paint(page, [(0.3, 0.3), (0.6, 0.35)])
    assert 0 < (_painted_mask(page) > 0).sum() < (painted > 0).sum()
    page.click("#undo")
    page.uncheck("#eraser")
    assert np.array_equal(_painted_mask(page), painted)
    page.select_option("#task", "inpaint")
    page.fill("textarea[name=prompt]", "a yellow circle")
    page.fill("input[name=steps]", "40")
    page.fill("input[name=seed]", "7")
    page.click("#generate")
    page.wait_for_selector("#status[data-state=done]", timeout=120_000)
    seen = page.evaluate("window.studioSeen")  # the bar moved: steps shown between the first and the last
    assert any(state == "running" and 0 < step < total for state, step, total in seen), seen
    assert page.evaluate("window.studioPreviews") > 0  # and step previews were shown
    expect(page.locator(".result")).to_have_count(1)
    page.click(".result .all-settings summary")
    shown_settings = page.inner_text(".result .all-settings pre")
    assert "prompt: a yellow circle" in shown_settings and "seed: 7" in shown_settings
    shot = os.environ.get("EDITSUITE_STUDIO_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)
    with page.expect_download() as got:
        page.click(".result .download")
    saved = tmp_path / "downloaded.png"
    got.value.save_as(saved)
    out = PIL.Image.open(saved)
    assert read_settings(saved)["prompt"] == "a yellow circle" and "a yellow circle" in out.info["parameters"]
    keep = painted == 0
    assert np.array_equal(np.asarray(out.convert("RGB"))[keep], np.asarray(photo.convert("RGB"))[keep])
    assert not np.array_equal(np.asarray(out.convert("RGB")), np.asarray(photo.convert("RGB")))
    # sent back as the next edit's input: the canvas then holds the result's pixels
    page.evaluate("document.getElementById('picture-info').textContent = ''")
    page.click(".result .use")
    page.wait_for_function("document.getElementById('picture-info').textContent.length > 0")
    shown = page.evaluate("""() => { const c = document.getElementById('picture');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")
    shown = np.asarray(shown, dtype=np.uint8).reshape(out.height, out.width, 4)[..., :3]
    assert np.array_equal(shown, np.asarray(out.convert("RGB")))


def test_the_page_cancels_shows_bad_input_and_runs_again(page, served, photo, tmp_path):
    from playwright.sync_api import expect

    big, small = tmp_path / "big.png", tmp_path / "small.png"
    photo.resize((200, 200)).save(big)  # above the studio's 160x160 limit
    photo.save(small)
    page.select_option("#task", "img2img")
    page.fill("textarea[name=prompt]", "a blue square")
    page.set_input_files("#file", str(big))
    page.wait_for_selector("#stage:not(.empty)")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "pixels" in page.inner_text("#error")
    page.set_input_files("#file", str(small))
    page.fill("input[name=strength]", "2")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.includes('strength must be between 0 and 1')")
    page.fill("input[name=strength]", "0.8")
    page.fill("input[name=steps]", "400")
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=60_000)
    page.click("#cancel")
    page.wait_for_selector("#status[data-state=cancelled]", timeout=60_000)
    assert not list((served[2] / "out").glob("*.png"))
    page.fill("input[name=steps]", "3")
    page.click("#generate")
    page.wait_for_selector("#status[data-state=done]", timeout=120_000)
    expect(page.locator(".result")).to_have_count(1)
    # the page's own requests carry its Origin and pass the check (a foreign one is refused: the next test)
    with page.expect_request("**/cancel") as sent:
        status = page.evaluate("""() => fetch('/api/jobs/1/cancel', {method: 'POST'}).then(r => r.status)""")
    assert status == 200 and sent.value.all_headers().get("origin") == served[0]


def test_a_foreign_page_cannot_start_an_edit(served):
    import urllib.request

    req = urllib.request.Request(served[0] + "/api/jobs", data=b"", method="POST",
                                 headers={"Origin": "http://evil.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403
    assert not served[1].jobs
