// editsuite studio: the page. Its forms come from the server's task descriptions (editsuite.tasks.describe());
// every rule and message is the server's. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const MAIN = ["prompt", "negative_prompt", "strength", "left", "right", "top", "bottom", "scale", "mask_blur",
  "only_masked", "steps", "guidance_scale", "seed"];
const state = { tasks: {}, source: null, undo: [], job: null, timer: null, previewShown: null };

// -- the picture and its mask --------------------------------------------------------------------------------
const picture = $("picture"), mask = $("mask"), stage = $("stage");
const mctx = mask.getContext("2d");

async function openPicture(blob) {
  const bitmap = await createImageBitmap(blob);
  picture.width = mask.width = bitmap.width;
  picture.height = mask.height = bitmap.height;
  picture.getContext("2d").drawImage(bitmap, 0, 0);
  // small pictures are shown enlarged (whole pixels) so that a brush can reach every pixel
  const zoom = Math.max(1, Math.floor(512 / Math.max(bitmap.width, bitmap.height)));
  picture.style.width = `${bitmap.width * zoom}px`;
  mctx.clearRect(0, 0, mask.width, mask.height);
  state.source = blob;
  state.undo = [];
  stage.classList.remove("empty");
  $("picture-info").textContent = `${bitmap.width} x ${bitmap.height}`;
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) openPicture(e.target.files[0]).catch(showError); });
stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragging"); });
stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
stage.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("dragging");
  if (e.dataTransfer.files[0]) openPicture(e.dataTransfer.files[0]).catch(showError);
});

$("brush").addEventListener("input", () => { $("brush-size").textContent = $("brush").value; });

function at(e) {  // pointer position in the mask's own pixels (the canvas is shown scaled)
  const r = mask.getBoundingClientRect();
  return [(e.clientX - r.left) * mask.width / r.width, (e.clientY - r.top) * mask.height / r.height];
}
let drawing = null;
mask.addEventListener("pointerdown", (e) => {
  if (!state.source || e.button !== 0) return;
  mask.setPointerCapture(e.pointerId);
  state.undo.push(mctx.getImageData(0, 0, mask.width, mask.height));
  if (state.undo.length > 30) state.undo.shift();
  const r = mask.getBoundingClientRect();
  mctx.lineWidth = Number($("brush").value) * mask.width / r.width;
  mctx.lineCap = mctx.lineJoin = "round";
  mctx.strokeStyle = mctx.fillStyle = "#fff";
  mctx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  drawing = at(e);
  mctx.beginPath();
  mctx.arc(drawing[0], drawing[1], mctx.lineWidth / 2, 0, 2 * Math.PI);
  mctx.fill();
});
mask.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const p = at(e);
  mctx.beginPath();
  mctx.moveTo(drawing[0], drawing[1]);
  mctx.lineTo(p[0], p[1]);
  mctx.stroke();
  drawing = p;
});
const stop = () => { drawing = null; mctx.globalCompositeOperation = "source-over"; };
mask.addEventListener("pointerup", stop);
mask.addEventListener("pointercancel", stop);

$("undo").addEventListener("click", () => { const d = state.undo.pop(); if (d) mctx.putImageData(d, 0, 0); });
$("clear").addEventListener("click", () => {
  state.undo.push(mctx.getImageData(0, 0, mask.width, mask.height));
  mctx.clearRect(0, 0, mask.width, mask.height);
});
$("invert").addEventListener("click", () => {
  const d = mctx.getImageData(0, 0, mask.width, mask.height);
  state.undo.push(mctx.getImageData(0, 0, mask.width, mask.height));
  for (let i = 0; i < d.data.length; i += 4) {
    d.data[i] = d.data[i + 1] = d.data[i + 2] = 255;
    d.data[i + 3] = 255 - d.data[i + 3];
  }
  mctx.putImageData(d, 0, 0);
});

function maskPng() {  // white where painted, black elsewhere, the picture's size
  const d = mctx.getImageData(0, 0, mask.width, mask.height);
  for (let i = 0; i < d.data.length; i += 4) {
    const v = d.data[i + 3] >= 128 ? 255 : 0;
    d.data[i] = d.data[i + 1] = d.data[i + 2] = v;
    d.data[i + 3] = 255;
  }
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  out.getContext("2d").putImageData(d, 0, 0);
  return new Promise((done) => out.toBlob(done, "image/png"));
}

// -- the form, from the task descriptions ------------------------------------------------------------------
function field(p) {
  const wrap = document.createElement("label");
  wrap.title = p.help;
  const name = p.name.replace(/_/g, " ");
  let input;
  if (p.type === "bool") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = !!p.default;
    wrap.append(input, name);
  } else if (p.choices) {
    input = document.createElement("select");
    if (p.optional) input.append(new Option(p.default === null ? "(the model's own)" : "", ""));
    for (const c of p.choices) input.append(new Option(c, c));
    input.value = p.default ?? "";
    wrap.append(name, input);
  } else if (p.name === "prompt" || p.name === "negative_prompt") {
    input = document.createElement("textarea");
    input.rows = p.name === "prompt" ? 3 : 2;
    input.value = p.default ?? "";
    wrap.append(name, input);
  } else {
    input = document.createElement("input");
    const number = p.type === "int" || p.type === "float";
    input.type = number ? "number" : "text";
    if (number) {
      input.step = p.type === "int" ? "1" : "any";
      if (p.min !== null) input.min = p.min;
      if (p.max !== null) input.max = p.max;
    }
    input.value = p.default ?? "";
    if (p.default === null) input.placeholder = "default";
    wrap.append(name, input);
  }
  input.name = p.name;
  input.dataset.type = p.type;
  if (p.optional) input.dataset.optional = "1";
  const help = document.createElement("div");
  help.className = "help";
  help.textContent = p.help;
  wrap.append(help);
  return wrap;
}

function showTask() {
  const t = state.tasks[$("task").value];
  $("task-help").textContent = t.summary || "";
  $("fields").replaceChildren();
  $("more-fields").replaceChildren();
  for (const p of t.params) {
    (MAIN.includes(p.name) ? $("fields") : $("more-fields")).append(field(p));
  }
}

function values() {  // typed as the parameter says; a number that does not parse goes as typed, for the server to name
  const out = {};
  for (const el of $("form").querySelectorAll("[data-type]")) {
    const type = el.dataset.type, raw = el.type === "checkbox" ? el.checked : el.value;
    if (type === "bool") out[el.name] = raw;
    else if (raw === "" && el.dataset.optional) out[el.name] = null;
    else if (type === "int" || type === "float") {
      const n = Number(raw);  // a number JS cannot hold exactly (a seed above 2^53) goes as typed
      out[el.name] = raw === "" || isNaN(n) || (type === "int" && !Number.isSafeInteger(n)) ? raw : n;
    }
    else out[el.name] = raw;
  }
  return out;
}

// -- running an edit ------------------------------------------------------------------------------------------
function showError(e) {
  $("error").textContent = typeof e === "string" ? e : (e.message || String(e));
  $("error").hidden = false;
}

async function generate(e) {
  e.preventDefault();
  $("error").hidden = true;
  const t = state.tasks[$("task").value];
  const body = new FormData();
  body.append("task", t.name);
  body.append("params", JSON.stringify(values()));
  if (t.inputs.length && state.source) body.append("image", state.source, "image");
  if (t.inputs.includes("mask") && state.source) body.append("mask", await maskPng(), "mask.png");
  const r = await fetch("/api/jobs", { method: "POST", body });
  const got = await answer(r);
  if (!r.ok) return showError(got.error);
  follow(got);
}

async function answer(r) {  // the server's JSON, or its status and text when something else answered
  if ((r.headers.get("content-type") || "").includes("json")) return r.json();
  return { error: `${r.status} ${(await r.text()).slice(0, 200)}` };
}

function follow(job) {
  state.job = job.id;
  $("cancel").disabled = false;
  $("preview").hidden = true;
  state.previewShown = null;
  show(job);
  clearInterval(state.timer);
  const id = job.id;
  state.timer = setInterval(async () => {
    try {
      const r = await fetch(`/api/jobs/${id}`);
      if (r.ok && state.job === id) show(await r.json());
    } catch (e) { /* the next tick asks again */ }
  }, 250);
}

window.studioSeen = [];  // every state shown, for the browser tests to check that the bar moved
function show(job) {
  if (job.id !== state.job) return;  // a late answer about an earlier run
  window.studioSeen.push([job.state, job.step, job.total]);
  const bar = $("progress");
  bar.max = job.total || 1;
  bar.value = job.state === "done" ? bar.max : job.step;
  const text = {
    queued: `waiting: number ${job.position} in the queue`,
    running: job.total ? `step ${job.step} of ${job.total}` : "starting",
    done: "done", cancelled: "cancelled", failed: "failed",
  }[job.state];
  $("status-text").textContent = text;
  $("status").dataset.state = job.state;
  if (job.preview !== null && job.preview !== state.previewShown && job.state === "running") {
    state.previewShown = job.preview;
    $("preview").src = `/api/jobs/${job.id}/preview?v=${job.preview}`;
    window.studioPreviews = (window.studioPreviews || 0) + 1;
    $("preview").hidden = false;
  }
  if (["done", "failed", "cancelled"].includes(job.state)) {
    clearInterval(state.timer);
    $("cancel").disabled = true;
    $("preview").hidden = true;
    if (job.state === "failed") showError(job.error);
    refreshGallery();
  }
}

$("form").addEventListener("submit", (e) => generate(e).catch(showError));
$("cancel").addEventListener("click", () => fetch(`/api/jobs/${state.job}/cancel`, { method: "POST" }));

// -- the gallery --------------------------------------------------------------------------------------------
async function refreshGallery() {
  const r = await fetch("/api/results");
  if (!r.ok) return;
  const items = await r.json();
  $("gallery").replaceChildren(...items.map((it) => {
    const card = document.createElement("div");
    card.className = "result";
    card.dataset.name = it.name;
    const img = new Image();
    img.src = it.url;
    img.alt = it.name;
    const s = it.settings;
    const info = document.createElement("div");
    info.className = "settings";
    info.textContent = `${s.task || ""} · seed ${s.seed} · ${s.prompt || ""}`;
    const all = document.createElement("details");  // every setting, as the PNG's metadata holds them
    all.className = "all-settings";
    const summary = document.createElement("summary");
    summary.textContent = "settings";
    const list = document.createElement("pre");
    list.textContent = Object.entries(s).filter(([, v]) => v !== null && typeof v !== "object")
      .map(([k, v]) => `${k}: ${v}`).join("\n");
    all.append(summary, list);
    const links = document.createElement("div");
    links.className = "links";
    const down = document.createElement("a");
    down.href = it.url;
    down.download = it.name;
    down.textContent = "Download";
    down.className = "download";
    const use = document.createElement("button");
    use.type = "button";
    use.textContent = "Use as input";
    use.className = "use";
    use.addEventListener("click", async () => openPicture(await (await fetch(it.url)).blob()).catch(showError));
    links.append(down, use);
    card.append(img, info, all, links);
    return card;
  }));
}

async function start() {
  const d = await (await fetch("/api/tasks")).json();
  $("model").textContent = `model: ${d.model}`;
  for (const t of d.tasks) {
    state.tasks[t.name] = t;
    $("task").append(new Option(t.name, t.name));
  }
  $("task").addEventListener("change", showTask);
  showTask();
  $("form").noValidate = true;
  refreshGallery();
  document.body.dataset.ready = "1";
}
start().catch(showError);
