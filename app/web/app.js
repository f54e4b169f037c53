// handwriting-ai page: draw or drop a digit and read it, see the model, train one and watch it live.
// Plain JavaScript, no libraries; it calls only the documented API (see /docs).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "handwriting-ai.admin-key";
const pct = (x) => (x * 100).toFixed(1) + "%";

// ---- errors as sentences -------------------------------------------------------------------------

async function apiError(response) {
  let body = {};
  try { body = await response.json(); } catch (_) { /* not JSON: the status says enough */ }
  const message = body.message || response.statusText || "no details";
  const lead = {
    400: "The server could not use that image",
    401: "The admin key was refused",
    404: "Not found",
    413: "That image is too large to read",
    415: "That file is not a PNG or JPEG image",
    422: "The request was not accepted",
    429: "Too many requests; wait a moment",
    503: "The service is not ready",
    504: "Reading took too long",
  }[response.status] || `The server answered ${response.status}`;
  const sentence = `${lead}: ${message}`.replace(/\s*$/, "");
  return { status: response.status, code: body.code || "", message, sentence: /[.!?]$/.test(sentence) ? sentence : sentence + "." };
}

function show(el, text) { el.textContent = text; el.hidden = !text; }

function adminKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

async function api(path, options = {}, admin = false) {
  const headers = new Headers(options.headers || {});
  if (admin) headers.set("X-Api-Key", adminKey());
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw { status: 0, code: "network", sentence: "The server cannot be reached; check that it is running." };
  }
  if (!response.ok) throw await apiError(response);
  return response.json();
}

// ---- live job state (Server-Sent Events) -----------------------------------------------------------

// Follows GET /v1/jobs/{id}/events; onState gets each public state, the last one with status finished/failed.
function followJob(jobId, onState) {
  const source = new EventSource(`/v1/jobs/${encodeURIComponent(jobId)}/events`);
  source.addEventListener("state", (event) => {
    const state = JSON.parse(event.data);
    if (state.status === "finished" || state.status === "failed") source.close();
    onState(state);
  });
  source.onerror = () => {
    // The browser reconnects by itself while the stream is open; a closed stream after the end is normal.
    if (source.readyState === EventSource.CLOSED) onState(null);
  };
  return source;
}

// ---- drawing pad ------------------------------------------------------------------------------------

const pad = $("pad");
const ctx = pad.getContext("2d");
let drawing = null; // the pointer id while a stroke is being drawn
let inked = false;

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  inked = false;
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  if (drawing !== null) return;
  event.preventDefault();
  drawing = event.pointerId;
  pad.setPointerCapture(event.pointerId);
  const [x, y] = padPoint(event);
  ctx.strokeStyle = "#000";
  ctx.fillStyle = "#000";
  ctx.lineWidth = pad.width / 14;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
  ctx.fill();
  ctx.beginPath();
  ctx.moveTo(x, y);
  inked = true;
});

pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== drawing) return;
  const points = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const p of points.length ? points : [event]) {
    const [x, y] = padPoint(p);
    ctx.lineTo(x, y);
  }
  ctx.stroke();
});

function endStroke(event) {
  if (event.pointerId !== drawing) return;
  drawing = null;
  if (inked) pad.toBlob((blob) => readImage(blob, "drawing.png"), "image/png");
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

$("clear").addEventListener("click", () => {
  clearPad();
  $("result").hidden = true;
  show($("read-error"), "");
});

// ---- photos: picker, drop, paste --------------------------------------------------------------------

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) readImage(file, file.name);
  event.target.value = "";
});

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("dragging"); });
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("dragging");
  const file = event.dataTransfer.files[0];
  if (file) readImage(file, file.name);
});

document.addEventListener("paste", (event) => {
  const target = event.target;
  if (target instanceof HTMLInputElement) return; // pasting text into a field
  const item = [...(event.clipboardData ? event.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
  if (item) { event.preventDefault(); readImage(item.getAsFile(), "pasted image"); }
});

// ---- reading ----------------------------------------------------------------------------------------

let readSeq = 0;
let noteJob = null;

async function readImage(blob, name) {
  const seq = ++readSeq;
  const form = new FormData();
  form.append("file", blob, name);
  $("status").textContent = `Reading ${name}…`;
  try {
    const answer = await api("/v1/read?visualize=true", { method: "POST", body: form });
    if (seq !== readSeq) return; // a newer read is on its way
    showAnswer(answer);
    show($("read-error"), "");
    $("status").textContent = `Read ${name}.`;
  } catch (err) {
    if (seq !== readSeq) return;
    $("result").hidden = true;
    show($("read-error"), err.sentence);
    $("status").textContent = "Could not read the image.";
    const job = err.status === 503 && /job ([A-Za-z0-9_-]+)/.exec(err.message || "");
    if (job) watchFirstModel(job[1]);
  }
}

function showAnswer(answer) {
  $("digit").textContent = String(answer.digit);
  $("confidence").textContent = pct(answer.confidence) + (answer.uncertain ? " (unsure)" : "");
  $("seen").src = answer.visual_png_b64 ? "data:image/png;base64," + answer.visual_png_b64 : "";
  const list = $("probs");
  list.replaceChildren(...answer.probs.map((p, digit) => {
    const li = document.createElement("li");
    if (digit === answer.digit) li.className = "top";
    li.setAttribute("aria-label", `${digit}: ${pct(p)}`);
    const label = document.createElement("span");
    label.textContent = String(digit);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = (p * 100).toFixed(2) + "%";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = pct(p);
    li.append(label, track, value);
    return li;
  }));
  $("read-model").textContent = `Read by ${answer.model_id} ${answer.version} in ${answer.latency_ms} ms.`;
  $("result").hidden = false;
}

// A read answered 503 while the first model trains: show that training's progress until it ends.
function watchFirstModel(jobId) {
  if (noteJob === jobId) return;
  noteJob = jobId;
  $("training-note").hidden = false;
  followJob(jobId, (state) => {
    if (state === null) return;
    const done = state.progress ? state.progress.pct : 0;
    $("note-bar").value = done;
    $("note-pct").textContent = `${state.stage || state.status}, ${done.toFixed(0)}%`;
    if (state.status === "finished" || state.status === "failed") {
      noteJob = null;
      $("training-note").hidden = true;
      show($("read-error"), state.status === "finished" && state.activated
        ? "The first model is ready: draw again." : "The training ended without a model going live.");
      loadModel();
    }
  });
}

// ---- the model ----------------------------------------------------------------------------------------

function accuracy(x) { return typeof x === "number" ? pct(x) : "–"; }
function when(iso) {
  return iso ? new Date(iso).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" }) : "–";
}

async function loadModel() {
  try {
    const active = await api("/v1/models/active");
    if (!active.model_loaded) {
      $("status").textContent = "No model is loaded yet.";
      for (const id of ["model-id", "model-version", "model-val", "model-test", "model-created", "model-live"]) {
        $(id).textContent = "–";
      }
      $("model-id").textContent = "none loaded yet";
    } else {
      $("status").textContent = `Serving ${active.model_id} ${active.version}.`;
      $("model-id").textContent = active.model_id;
      $("model-version").textContent = active.version;
      $("model-val").textContent = accuracy(active.val_acc);
      $("model-test").textContent = accuracy(active.test_acc);
      $("model-created").textContent = when(active.created_at);
      $("model-live").textContent = when(active.activated_at);
    }
  } catch (err) {
    $("status").textContent = err.sentence;
  }
  await loadVersions();
}

async function loadVersions() {
  const table = $("versions-table");
  if (!adminKey()) {
    table.hidden = true;
    $("versions-hint").hidden = false;
    show($("versions-error"), "");
    return;
  }
  $("versions-hint").hidden = true;
  try {
    const listing = await api("/v1/admin/models", {}, true);
    show($("versions-error"), "");
    $("versions").replaceChildren(...listing.versions.map(versionRow));
    table.hidden = false;
    if (!listing.versions.length) show($("versions-error"), "No versions are stored yet.");
  } catch (err) {
    table.hidden = true;
    show($("versions-error"), err.sentence);
  }
}

function versionRow(v) {
  const tr = document.createElement("tr");
  if (v.active) tr.className = "active";
  const name = document.createElement("td");
  const model = document.createElement("span");
  model.className = "sub";
  model.textContent = v.model_id;
  name.append(v.version, model);
  tr.append(name);
  const gate = { passed: "passed", refused: "refused", forced: "forced" }[v.gate] || "–";
  for (const text of [when(v.manifest.created_at),
    `${accuracy(v.manifest.val_acc)} / ${accuracy(v.manifest.test_acc)}`, gate]) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.append(td);
  }
  const td = document.createElement("td");
  if (v.active) {
    td.textContent = "active";
  } else {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Activate";
    button.setAttribute("aria-label", `Activate ${v.model_id} ${v.version}`);
    button.addEventListener("click", () => activate(v.model_id, v.version, button));
    td.append(button);
  }
  tr.append(td);
  return tr;
}

async function activate(modelId, version, button) {
  button.disabled = true;
  try {
    await api(`/v1/admin/models/${encodeURIComponent(modelId)}/versions/${encodeURIComponent(version)}/activate`,
      { method: "POST" }, true);
    $("status").textContent = `Activated ${modelId} ${version}.`;
  } catch (err) {
    show($("versions-error"), err.sentence);
  }
  await loadModel();
}

// ---- admin key ------------------------------------------------------------------------------------------

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
  $("key").value = "";
  keyChanged();
});
$("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); keyChanged(); });

function keyChanged(reload = true) {
  const has = Boolean(adminKey());
  $("key").placeholder = has ? "key set for this tab" : "";
  $("key-forget").disabled = !has;
  $("train-start").disabled = !has;
  $("train-start").title = has ? "" : "Enter the admin key first";
  if (reload) loadVersions();
}

// ---- training ---------------------------------------------------------------------------------------------

// The /train options' bounds, from DigitsTrainJobV1's JSON schema that the server put into the page.
const trainSchema = JSON.parse($("train-schema").textContent);
const trainForm = $("train-form");

function applyBounds() {
  for (const input of trainForm.elements) {
    if (!input.name || !(input.name in trainSchema)) continue;
    const spec = trainSchema[input.name];
    const rule = (spec.anyOf || [spec]).find((s) => s.type && s.type !== "null") || spec;
    if (input.type === "checkbox") { input.checked = Boolean(spec.default); continue; }
    if ("minimum" in rule) input.min = rule.minimum;
    if ("maximum" in rule) input.max = rule.maximum;
    if ("exclusiveMinimum" in rule) input.min = rule.exclusiveMinimum === 0 ? 1e-6 : rule.exclusiveMinimum;
    if ("maxLength" in rule) input.maxLength = rule.maxLength;
    // The pattern attribute is compiled with the `v` flag, where a literal "-" in a class needs its backslash.
    if ("pattern" in rule) input.pattern = rule.pattern.replace(/^\^|\$$/g, "").replace(/([^\\])-\]/g, "$1\\-]");
    if (rule.type === "integer") input.step = 1;
    if (spec.default !== undefined && spec.default !== null) input.value = spec.default;
  }
}

function trainBody() {
  const body = {};
  for (const input of trainForm.elements) {
    if (!input.name) continue;
    if (!input.checkValidity()) {
      const label = input.closest("label").textContent.trim();
      throw { sentence: `${label}: ${input.validationMessage}` };
    }
    if (input.type === "checkbox") body[input.name] = input.checked;
    else if (input.type === "number") body[input.name] = Number(input.value);
    else if (input.name === "notes") body.notes = input.value || null;
    else body[input.name] = input.value;
  }
  return body;
}

let batchSize = 0;
let watched = null;

trainForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  show($("train-error"), "");
  let body;
  try { body = trainBody(); } catch (err) { show($("train-error"), err.sentence); return; }
  $("train-start").disabled = true;
  try {
    const accepted = await api("/v1/train", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    }, true);
    batchSize = body.batch_size;
    watchTraining(accepted.job_id);
  } catch (err) {
    show($("train-error"), err.sentence);
    $("train-start").disabled = !adminKey();
  }
});

function watchTraining(jobId) {
  if (watched) watched.close();
  $("job").hidden = false;
  $("job-id").textContent = jobId;
  $("job-result").textContent = "";
  $("job-result").className = "";
  for (const id of ["job-epoch", "job-loss", "job-speed", "job-eta"]) $(id).textContent = "–";
  $("job-bar").value = 0;
  $("job-pct").textContent = "0%";
  watched = followJob(jobId, (state) => {
    if (state === null) { $("job-stage").textContent = "connection lost"; return; }
    $("job-stage").textContent = state.stage || state.status;
    const p = state.progress;
    if (p) {
      $("job-bar").value = p.pct;
      $("job-pct").textContent = p.pct.toFixed(0) + "%";
      $("job-epoch").textContent = `${p.epoch} / ${p.total_epochs} (batch ${p.batch} / ${p.total_batches})`;
      $("job-loss").textContent = p.loss.toFixed(4);
      $("job-speed").textContent = p.samples_per_sec.toFixed(0);
      const left = (p.total_epochs - p.epoch) * p.total_batches + (p.total_batches - p.batch);
      $("job-eta").textContent = p.samples_per_sec > 0 && batchSize
        ? duration(left * batchSize / p.samples_per_sec) : "–";
    }
    if (state.status === "finished") trainingEnded(state);
    if (state.status === "failed") trainingFailed(jobId, state);
  });
}

function duration(seconds) {
  if (seconds < 1) return "under a second";
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  return m ? `${m} min ${s} s` : `${s} s`;
}

function trainingEnded(state) {
  $("job-eta").textContent = "done";
  const result = $("job-result");
  const gate = typeof state.gate_candidate_acc === "number" && typeof state.gate_active_acc === "number"
    ? ` (gate set: ${accuracy(state.gate_candidate_acc)} against ${accuracy(state.gate_active_acc)} for the model`
      + " in service)" : "";
  const live = state.activated
    ? `it is now the active model${gate}`
    : state.gate_decision === "refused"
      ? `it did not go live: the promotion gate found it worse than the model in service${gate}`
      : "it was stored but did not go live";
  result.textContent = `Finished: version ${state.version}, validation accuracy ${accuracy(state.val_acc)}, `
    + `test accuracy ${accuracy(state.test_acc)}; ${live}.`;
  result.className = state.activated ? "good" : "";
  $("train-start").disabled = !adminKey();
  loadModel();
}

async function trainingFailed(jobId, state) {
  let message = state.error_kind === "user" ? "the job's options were refused" : "a system error";
  try {
    const full = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, {}, true);
    if (full.error && full.error.message) message = full.error.message;
  } catch (_) { /* the public reason above will do */ }
  $("job-result").textContent = `The training failed: ${message}`.replace(/([^.!?])$/, "$1.");
  $("job-result").className = "bad";
  $("train-start").disabled = !adminKey();
}

// ---- start ------------------------------------------------------------------------------------------------

clearPad();
applyBounds();
keyChanged(false);
loadModel();
