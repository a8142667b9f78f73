// The gallery: submit prompts, watch recent requests live. No framework, no build step.
//
// Event streams are read with fetch() rather than EventSource, which cannot send the
// Authorization header that a gateway with API keys needs; for the same reason images
// are fetched and shown through object URLs when a key is set.
"use strict";

const config = JSON.parse(document.getElementById("config").textContent);
const TERMINAL = new Set(["done", "failed"]);
// Browsers keep about six connections per host: leave room for everything else.
const MAX_STREAMS = 3;
const REFRESH_MS = 3000;

const cards = new Map(); // request id -> {el, state, streaming, step}
const $ = (id) => document.getElementById(id);

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.message || `${response.status} ${response.statusText}`);
  }
  return body;
}

// --- rendering ----------------------------------------------------------------------

function card(status) {
  let entry = cards.get(status.id);
  if (!entry) {
    const el = $("card-template").content.firstElementChild.cloneNode(true);
    el.dataset.id = status.id;
    $("requests").prepend(el);
    entry = { el, state: null, streaming: false, step: 0 };
    cards.set(status.id, entry);
    $("empty").hidden = true;
  }
  return entry;
}

function setProgress(entry, step, steps) {
  const bar = entry.el.querySelector("progress.steps");
  entry.step = Math.max(entry.step, step); // a slower status poll never moves it back
  bar.max = steps;
  bar.value = Math.min(entry.step, steps);
  entry.el.querySelector(".step-text").textContent = `${bar.value}/${steps}`;
}

function showImage(img, url) {
  if (!url || img.dataset.url === url) return;
  img.dataset.url = url;
  if (!apiKey()) {
    img.src = url;
    return;
  }
  fetch(url, { headers: authHeaders() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { delete img.dataset.url; });
}

function figure(url, caption, cutout) {
  const fig = document.createElement("figure");
  if (cutout) fig.classList.add("cutout");
  const img = document.createElement("img");
  img.alt = caption;
  showImage(img, url);
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

function renderImages(entry, status) {
  const box = entry.el.querySelector(".images");
  const signature = JSON.stringify(status.images.map((i) => [i.status, i.image_url]));
  if (box.dataset.signature === signature) return;
  box.dataset.signature = signature;
  box.replaceChildren();
  for (const image of status.images) {
    if (!image.image_url) continue;
    const row = document.createElement("div");
    row.className = "image-row";
    row.append(figure(image.image_url, `image ${image.image_index}`, false));
    for (const asset of image.assets) {
      row.append(figure(asset.url, `${asset.label} ${asset.score.toFixed(2)}`, true));
    }
    if (image.asset_status === "no_match") {
      const note = document.createElement("span");
      note.className = "no-match";
      note.textContent = "no object matched";
      row.append(note);
    }
    box.append(row);
  }
}

function render(status) {
  const entry = card(status);
  const el = entry.el;
  entry.state = status.status;
  el.querySelector(".prompt").textContent = status.prompt || "(no prompt)";
  el.querySelector(".rid").textContent = status.id;
  el.querySelector(".targets").textContent = status.targets.length
    ? `targets: ${status.targets.join(", ")}` : "";
  const badge = el.querySelector(".badge");
  badge.textContent = status.status;
  badge.className = `badge ${status.status}`;
  const steps = (status.progress && status.progress.steps) || status.steps || 1;
  const generated = ["segmenting", "done"].includes(status.status);
  setProgress(entry, generated ? steps : (status.progress ? status.progress.step : 0), steps);
  const reasons = [status.error, ...status.images.map((i) => i.error)].filter(Boolean);
  const failure = el.querySelector(".failure");
  failure.hidden = reasons.length === 0;
  failure.textContent = reasons.length
    ? `failed in ${reasons[0].stage}: ${reasons[0].type}: ${reasons[0].message}` : "";
  renderImages(entry, status);
  if (!TERMINAL.has(status.status)) follow(status);
}

// --- live updates -------------------------------------------------------------------

function openStreams() {
  let n = 0;
  for (const entry of cards.values()) if (entry.streaming) n += 1;
  return n;
}

async function refreshOne(id) {
  try {
    render(await api(`/v1/requests/${encodeURIComponent(id)}`));
  } catch (err) {
    console.warn("status of", id, err);
  }
}

function handle(entry, id, kind, data) {
  if (kind === "progress") {
    const event = JSON.parse(data);
    setProgress(entry, event.step, event.steps);
    const badge = entry.el.querySelector(".badge");
    if (badge.textContent === "queued") {
      badge.textContent = badge.className = "generating";
      badge.classList.add("badge");
    }
  } else if (["image", "asset", "dead_letter", "end"].includes(kind)) {
    refreshOne(id);
  }
}

async function follow(status) {
  const entry = cards.get(status.id);
  if (entry.streaming || openStreams() >= MAX_STREAMS) return;
  entry.streaming = true;
  try {
    const response = await fetch(status.events_url, { headers: authHeaders() });
    if (!response.ok || !response.body) return;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
        }
        if (data.length) handle(entry, status.id, kind, data.join("\n"));
      }
    }
  } catch (err) {
    console.warn("event stream of", status.id, err);
  } finally {
    entry.streaming = false;
  }
}

async function refresh() {
  try {
    const { requests } = await api("/v1/requests?limit=12");
    for (const status of requests.slice().reverse()) render(status);
  } catch (err) {
    console.warn("recent requests", err);
  }
}

// --- the form -----------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  const error = $("form-error");
  error.hidden = true;
  const size = Number($("size").value);
  const body = {
    prompt: $("prompt").value.trim(),
    targets: $("targets").value.split(",").map((t) => t.trim()).filter(Boolean),
    width: size,
    height: size,
    steps: Number($("steps").value),
    segmentation: { min_confidence: Number($("min-confidence").value) },
  };
  if (apiKey()) localStorage.setItem("genseg-api-key", apiKey());
  $("submit").disabled = true;
  try {
    const accepted = await api("/v1/requests", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    await refreshOne(accepted.id);
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    $("submit").disabled = false;
  }
}

function setUp() {
  $("models").textContent = config.models;
  for (const size of config.sizes) {
    const option = new Option(`${size} × ${size}`, size, false, size === config.size);
    $("size").add(option);
  }
  $("steps").value = config.steps;
  $("min-confidence").value = config.min_confidence;
  $("key-field").hidden = !config.auth;
  $("api-key").value = localStorage.getItem("genseg-api-key") || "";
  $("submit-form").addEventListener("submit", submit);
  refresh();
  setInterval(refresh, REFRESH_MS);
}

setUp();
