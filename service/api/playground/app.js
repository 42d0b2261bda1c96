// Bora playground: plain JavaScript against the public API of the server that serves this page.
// The API key lives in sessionStorage (this tab only) and travels only in an Authorization header, so the live
// event stream is read with fetch() streaming: EventSource cannot send that header.
"use strict";

const KEY_STORAGE = "bora.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const PARAMS = ["num_frames", "height", "width", "fps", "num_inference_steps", "guidance_scale", "sampler", "seed"];
const $ = (id) => document.getElementById(id);

let served = null;          // /playground/model.json: the served model's bounds and defaults
let follow = null;          // AbortController of the job being followed
let objectUrls = [];        // blob: URLs of the shown video and poster, revoked when another job is shown

class ApiError extends Error {
  constructor(status, error, retryAfter) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = error && error.code;
    this.param = error && error.param;
    this.retryAfter = retryAfter;
  }

  static async from(response) {
    let error = null;
    try { error = (await response.json()).error || null; } catch (_) { /* not JSON: a proxy's page */ }
    const retry = response.headers.get("Retry-After");
    return new ApiError(response.status, error, retry && /^\d+$/.test(retry) ? Number(retry) : null);
  }
}

// ---- messages ------------------------------------------------------------------------------------------

function explain(err) {
  if (!(err instanceof ApiError)) return `Unexpected error: ${err.message || err}`;
  const wait = err.retryAfter != null ? ` Try again in ${err.retryAfter} s.` : " Try again shortly.";
  switch (err.status) {
    case 0:
      return "Cannot reach the service. Check that it is running and that this page came from it.";
    case 401:
      if (err.code === "missing_api_key") return "This server needs an API key: enter yours in the API key field.";
      if (err.code === "invalid_api_key") {
        return "Your API key was refused: it is unknown, revoked or mistyped. Check the API key field.";
      }
      return `Not authorized: ${err.message}`;
    case 404:
      return err.code === "job_not_found"
        ? "That job does not exist for this API key: it was deleted, has expired, or belongs to another key."
        : `Not found: ${err.message}`;
    case 409:
      return `Not possible now: ${err.message}`;
    case 413:
      return `The request is too large: ${err.message}`;
    case 422: {
      const field = err.param ? err.param.replace(/^(body|query|header)\./, "") : null;
      return field ? `Invalid ${field}: ${err.message}` : `Invalid request: ${err.message}`;
    }
    case 429:
      return `Too many submissions, or the queue is full: ${err.message}.${wait}`;
    case 503:
      return `The service is temporarily unavailable: ${err.message}.${wait}`;
    default:
      return `The service answered ${err.status}: ${err.message}`;
  }
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.dataset.status = kind;
  box.hidden = false;
}

function showError(err) {
  showMessage(explain(err));
  $("message").dataset.status = String(err.status ?? "");
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
  delete $("message").dataset.status;
}

// ---- API -----------------------------------------------------------------------------------------------

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function api(method, path, body, extraHeaders = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      cache: "no-store",
      headers: headers({ Accept: "application/json", ...(body ? { "Content-Type": "application/json" } : {}),
                         ...extraHeaders }),
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (_) {
    throw new ApiError(0, null, null);
  }
  if (!response.ok) throw await ApiError.from(response);
  return response.status === 204 ? null : response.json();
}

function newIdempotencyKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));  // plain http on a non-loopback host
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---- the form ------------------------------------------------------------------------------------------

async function loadServedModel() {
  served = await (await fetch("/playground/model.json", { cache: "no-store" })).json();
  const d = served.defaults;
  $("model-name").textContent = `model: ${served.name}`;
  $("auth-mode").textContent = served.auth_required
    ? "This server requires a key."
    : "Auth is off on this server (loopback only): no key needed.";
  setBounds("num_frames", 1, served.max_frames, 1, d.num_frames);
  setBounds("height", served.min_side, served.max_side, served.size_multiple, d.height);
  setBounds("width", served.min_side, served.max_side, served.size_multiple, d.width);
  setBounds("fps", 1, 60, 1, d.fps);
  setBounds("guidance_scale", 0, served.max_guidance, 0.5, d.guidance_scale);
  const sampler = $("sampler");
  for (const name of served.samplers) sampler.add(new Option(name, name, false, name === d.sampler));
  sampler.addEventListener("change", stepBounds);
  stepBounds();
  $("num_inference_steps").value = d.num_inference_steps;
  $("prompt").maxLength = served.max_prompt_chars;
  $("prompt-max").textContent = served.max_prompt_chars;
  $("bounds").textContent = `${served.name} was trained on ${served.trained.join(" × ")} (frames × height × width);`
    + ` sides ${served.min_side}–${served.max_side} in steps of ${served.size_multiple}, up to ${served.max_frames}`
    + " frames. Other shapes work, with lower quality.";
}

function setBounds(id, min, max, step, value) {
  const input = $(id);
  Object.assign(input, { min, max, step });
  input.value = value;
}

function stepBounds() {
  const input = $("num_inference_steps");
  input.min = 1;
  input.max = served.max_steps[$("sampler").value];
}

async function loadPresets() {
  const presets = await (await fetch("/playground/presets.json")).json();
  const select = $("preset");
  for (const domain of presets.domains) {
    const group = document.createElement("optgroup");
    group.label = domain.label;
    domain.prompts.forEach((text, i) => {
      group.appendChild(new Option(`${domain.label} ${i + 1}: ${text.slice(0, 70)}…`, text));
    });
    select.appendChild(group);
  }
  select.addEventListener("change", () => {
    if (select.value) { $("prompt").value = select.value; countPrompt(); }
  });
}

function countPrompt() {
  $("prompt-count").textContent = $("prompt").value.length;
}

function requestBody() {
  const body = { prompt: $("prompt").value };
  for (const name of PARAMS) {
    const raw = $(name).value.trim();
    if (raw === "") continue;
    body[name] = name === "sampler" ? raw : Number(raw);
  }
  return body;
}

async function submit(event) {
  event.preventDefault();
  clearMessage();
  const button = $("submit");
  button.disabled = true;
  try {
    const job = await api("POST", "/v1/videos", requestBody(), { "Idempotency-Key": newIdempotencyKey() });
    for (const warning of job.warnings || []) showMessage(`Note: ${warning.message}`, "info");
    showJob(job);
    refreshRecent();
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// ---- one job -------------------------------------------------------------------------------------------

function showJob(job) {
  if (follow) follow.abort();
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
  $("result").hidden = true;
  $("video").removeAttribute("src");
  $("video").removeAttribute("poster");
  render(job);
  if (TERMINAL.has(job.status)) finished(job);
  else followJob(job.id);
}

function render(job) {
  $("job-id").textContent = job.id;
  $("job-panel").dataset.status = job.status;
  $("status").textContent = job.status + (job.error ? ` (${job.error.code}: ${job.error.message})` : "");
  $("stage").textContent = job.status === "succeeded" ? "done" : (job.stage || "—");
  $("step").textContent = job.step != null && job.total_steps ? `${job.step} / ${job.total_steps}` : "—";
  $("queue-position").textContent = job.status === "queued" && job.queue_position ? `#${job.queue_position}` : "—";
  $("eta").textContent = job.eta_seconds != null && !TERMINAL.has(job.status) ? `~${Math.round(job.eta_seconds)} s` : "—";
  $("progress").value = job.progress || 0;
  $("cancel").disabled = TERMINAL.has(job.status) || job.status === "canceling";
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// Reads `text/event-stream` lines from a fetch() body; yields {event, data}; keeps `lastId` and `retryMs`.
async function* serverSentEvents(response, state) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let event = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (data.length) yield { event: event || "message", data: data.join("\n") };
        data = [];
        event = "";
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let field = colon < 0 ? "" : line.slice(colon + 1);
        if (field.startsWith(" ")) field = field.slice(1);
        if (name === "data") data.push(field);
        else if (name === "event") event = field;
        else if (name === "id") state.lastId = field;
        else if (name === "retry" && /^\d+$/.test(field)) state.retryMs = Number(field);
      }
    }
  }
}

// Follows the job's live events, reconnecting with Last-Event-ID; polls if the stream cannot be had.
async function followJob(id) {
  const controller = new AbortController();
  follow = controller;
  const { signal } = controller;
  const state = { lastId: null, retryMs: 2000 };
  let failures = 0;
  while (!signal.aborted && failures < 5) {
    const extra = { Accept: "text/event-stream" };
    if (state.lastId) extra["Last-Event-ID"] = state.lastId;
    let response;
    try {
      response = await fetch(`/v1/videos/${id}/events`, { headers: headers(extra), cache: "no-store", signal });
    } catch (_) {
      if (signal.aborted) return;
      failures += 1;
      await sleep(state.retryMs, signal);
      continue;
    }
    if (!response.ok) {
      const err = await ApiError.from(response);
      if (err.status === 429 || err.status === 503) {
        failures += 1;
        await sleep((err.retryAfter ?? 2) * 1000, signal);
        continue;
      }
      if (err.status === 401 || err.code === "job_not_found") { showError(err); return; }
      break;  // no event stream on this route: poll
    }
    $("live").textContent = "Live: following the job's event stream.";
    try {
      for await (const message of serverSentEvents(response, state)) {
        if (message.event !== "job") continue;
        failures = 0;
        const job = JSON.parse(message.data);
        render(job);
        if (TERMINAL.has(job.status)) { finished(job); return; }
      }
    } catch (_) {
      if (signal.aborted) return;
      failures += 1;
      await sleep(state.retryMs, signal);
    }
    // The stream ended (the server's time limit, or a dropped connection): reconnect where it left off,
    // unless the job ended or disappeared meanwhile.
    try {
      const job = await api("GET", `/v1/videos/${id}`);
      if (TERMINAL.has(job.status)) { render(job); finished(job); return; }
    } catch (err) {
      if (err.status === 401 || err.status === 404) { showError(err); return; }
    }
  }
  if (!signal.aborted) await poll(id, signal);
}

async function poll(id, signal) {
  $("live").textContent = "Polling the job every second (no event stream).";
  while (!signal.aborted) {
    try {
      const job = await api("GET", `/v1/videos/${id}`);
      render(job);
      if (TERMINAL.has(job.status)) { finished(job); return; }
    } catch (err) {
      showError(err);
      if (err.status === 401 || err.status === 404) return;
    }
    await sleep(1000, signal);
  }
}

async function fetchBlob(path) {
  let response;
  try {
    response = await fetch(path, { headers: headers(), cache: "no-store" });
  } catch (_) {
    throw new ApiError(0, null, null);
  }
  if (!response.ok) throw await ApiError.from(response);
  return response.blob();
}

async function sha256Hex(blob) {
  if (!crypto.subtle) return null;  // not a secure context: skip the check, the server's TLS covers transport
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function finished(job) {
  $("live").textContent = `Job ${job.status}.`;
  $("cancel").disabled = true;
  refreshRecent();
  if (job.status !== "succeeded" || !job.outputs) return;
  try {
    const [video, poster] = await Promise.all([
      fetchBlob(`/v1/videos/${job.id}/content`),
      job.outputs.thumbnail ? fetchBlob(`/v1/videos/${job.id}/content?variant=thumbnail`) : null,
    ]);
    const digest = await sha256Hex(video);
    if (digest && job.outputs.video.sha256 && digest !== job.outputs.video.sha256) {
      showMessage("The downloaded video does not match the checksum in its job record; not shown.");
      return;
    }
    const videoUrl = URL.createObjectURL(video);
    objectUrls.push(videoUrl);
    const player = $("video");
    if (poster) {
      const posterUrl = URL.createObjectURL(poster);
      objectUrls.push(posterUrl);
      player.poster = posterUrl;
    }
    player.src = videoUrl;
    const link = $("download");
    link.href = videoUrl;
    link.download = `${job.id}.mp4`;
    link.textContent = `Download MP4 (${(job.outputs.video.bytes / 1024).toFixed(1)} KiB${digest ? ", sha256 verified" : ""})`;
    $("seed-used").textContent = job.seed;
    $("metadata").textContent = JSON.stringify({
      id: job.id, model: job.model, weights_sha256: job.weights_sha256, seed: job.seed, input: job.input,
      metadata: job.metadata, warnings: job.warnings, timings: job.timings, video: job.outputs.video,
      created_at: job.created_at, completed_at: job.completed_at, label: "synthetic — AI-generated",
    }, null, 2);
    $("result").hidden = false;
    player.play().catch(() => { /* autoplay refused: the controls are there */ });
  } catch (err) {
    showError(err);
  }
}

async function cancel() {
  const id = $("job-id").textContent;
  clearMessage();
  try {
    render(await api("POST", `/v1/videos/${id}/cancel`));
  } catch (err) {
    showError(err);
  }
}

async function deleteJob() {
  const id = $("job-id").textContent;
  if (!window.confirm(`Delete job ${id}, its video and its record? This cannot be undone.`)) return;
  try {
    await api("DELETE", `/v1/videos/${id}`);
    if (follow) follow.abort();
    $("result").hidden = true;
    showMessage(`Deleted ${id}.`, "info");
    refreshRecent();
  } catch (err) {
    showError(err);
  }
}

// ---- recent jobs ---------------------------------------------------------------------------------------

async function refreshRecent() {
  if (served && served.auth_required && !$("api-key").value.trim()) return;
  const body = $("recent").tBodies[0];
  try {
    const page = await api("GET", "/v1/videos?limit=10");
    if (["401", "503"].includes($("message").dataset.status)) clearMessage();  // the key or service is fine now
    body.replaceChildren(...page.data.map((job) => {
      const row = document.createElement("tr");
      row.dataset.id = job.id;
      for (const [text, cls] of [[new Date(job.created_at).toLocaleString(), ""], [job.status, "status"],
                                 [job.input.prompt ?? `sha256 ${job.input.prompt_sha256}`, "prompt"]]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        if (cls) cell.className = cls;
        row.appendChild(cell);
      }
      row.addEventListener("click", () => { clearMessage(); showJob(job); });
      return row;
    }));
  } catch (err) {
    showError(err);
  }
}

// ---- start ---------------------------------------------------------------------------------------------

async function start() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  let timer = null;
  key.addEventListener("input", () => {
    const value = key.value.trim();
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
    clearTimeout(timer);
    timer = setTimeout(refreshRecent, 400);
  });
  $("forget-key").addEventListener("click", () => { key.value = ""; sessionStorage.removeItem(KEY_STORAGE); });
  $("prompt").addEventListener("input", countPrompt);
  $("request-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("delete").addEventListener("click", deleteJob);
  $("refresh").addEventListener("click", () => { clearMessage(); refreshRecent(); });
  try {
    await Promise.all([loadServedModel(), loadPresets()]);
  } catch (_) {
    showMessage("Cannot load the playground's settings from the service. Is it running?");
    return;
  }
  document.body.dataset.ready = "true";
  refreshRecent();
}

document.addEventListener("DOMContentLoaded", start);
