// The market's web page: choose classes, pack them, download the pack, try it on images; and,
// for developers, upload a model and follow it until it is sliced and served.
// Plain JS over the JSON API (no build step, no external resources).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { catalogue: null, selected: new Set(), pack: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "for" || k === "role") {
      node.setAttribute(k, v);
    } else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

function formatParams(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

const percent = (p) => `${(100 * p).toFixed(1)} %`;

// The access token, if the market asks for one: kept for this tab only (sessionStorage), sent as
// "Authorization: Bearer <token>" with every API request.
const TOKEN_KEY = "snp-market-token";
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

function withToken(options = {}) {
  const t = token();
  if (!t) return options;
  return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${t}` } };
}

// What a refusal of who is asking means for the person at the page.
function accessHint(status, response) {
  if (status === 401) {
    return token() ? "The access token was refused (unknown or revoked): enter another one above."
                   : "This market needs an access token: enter it above.";
  }
  if (status === 403) return "Your access token's role may not do this.";
  if (status === 429) {
    const after = response.headers.get("Retry-After");
    return `Too many requests for your token${after ? `: try again in ${after} s` : ""}.`;
  }
  return "";
}

// A JSON request; a refusal becomes an Error carrying the service's {"error", ...} body.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, withToken(options));
  } catch (e) {
    throw new Error(`the service did not answer (${e.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (!response.ok) {
    const err = new Error((body && body.error) || `HTTP ${response.status} ${response.statusText}`);
    err.body = body || {};
    err.status = response.status;
    err.hint = accessHint(response.status, response);
    throw err;
  }
  return body;
}

function showError(err, boxId = "error") {
  const box = $(boxId);
  box.replaceChildren(el("strong", { text: "Error: " }),
                      el("span", { id: "error-message", text: err.message }));
  const close = err.body && err.body.close_matches;
  if (close && close.length) {
    box.append(el("span", { class: "close-matches", text: ` Did you mean: ${close.join(", ")}?` }));
  }
  if (err.hint) box.append(el("span", { id: "error-hint", class: "hint", text: ` ${err.hint}` }));
  box.hidden = false;
  if (err.status === 401) $("token-input").focus();
}

function clearBox(boxId) {
  $(boxId).hidden = true;
  $(boxId).replaceChildren();
}

// ------------------------------------------------------------------ access token
function showToken() {
  const t = token();
  $("token-status").textContent = t ? "A token is in use for this tab." : "";
  $("token-forget").hidden = !t;
  $("token-input").value = "";
}

function saveToken(e) {
  e.preventDefault();
  const t = $("token-input").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  showToken();
  clearError();
  loadCatalogue();
  if (!$("developer-panel").hidden) loadModels();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  showToken();
}

// A download link carries no header: with a token, fetch the file and save it from memory.
async function download(e) {
  if (!token()) return;               // an open market: the plain link downloads
  e.preventDefault();
  const link = e.currentTarget;
  clearError();
  try {
    const response = await fetch(link.getAttribute("href"), withToken());
    if (!response.ok) {
      let body = {};
      try { body = await response.json(); } catch (_) { body = {}; }
      const err = new Error(body.error || `HTTP ${response.status} ${response.statusText}`);
      Object.assign(err, { body, status: response.status, hint: accessHint(response.status, response) });
      throw err;
    }
    const url = URL.createObjectURL(await response.blob());
    const a = el("a", { href: url, download: link.download });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    showError(err);
  }
}

function clearError() {
  clearBox("error");
}

// ------------------------------------------------------------------ catalogue
async function loadCatalogue() {
  try {
    const cat = await api("/v1/classes");
    state.catalogue = cat;
    const n = cat.classes.length;
    $("catalogue-summary").textContent =
      `${n} class${n === 1 ? "" : "es"} from ${cat.models} model${cat.models === 1 ? "" : "s"}` +
      (cat.dataset ? ` (${cat.dataset})` : "") + `; slice preset ${cat.preset}; ` +
      `catalogue ${cat.version}`;
    $("k-select").replaceChildren(...cat.ks.map((k) => el("option", { value: String(k), text: String(k) })));
    if (cat.ks.includes(10)) $("k-select").value = "10";
    if (cat.dataset && !$("model-dataset").value) $("model-dataset").value = cat.dataset;
    renderClasses();
  } catch (e) {
    $("catalogue-summary").textContent = "The class catalogue did not load.";
    showError(e);
  }
}

function renderClasses() {
  const list = $("class-list");
  const items = state.catalogue.classes.map((c) => {
    const id = `class-${c.id}`;
    const box = el("input", { type: "checkbox", id, value: c.name,
                              checked: state.selected.has(c.name) });
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(c.name);
      else state.selected.delete(c.name);
      item.classList.toggle("selected", box.checked);
      updateCounts();
    });
    const holders = c.holders.length;
    const item = el("li", { class: "class-option", "data-testid": "class-option",
                            "data-class": c.name },
      box,
      el("label", { for: id },
         el("span", { class: "class-name", text: c.name }),
         el("span", { class: "class-meta", "data-testid": "class-holders",
                      text: `${holders} holder${holders === 1 ? "" : "s"} · k ${c.ks.join(", ")}` })));
    item.classList.toggle("selected", box.checked);
    return item;
  });
  list.replaceChildren(...items);
  filterClasses();
}

function filterClasses() {
  const q = $("class-search").value.trim().toLowerCase();
  let shown = 0;
  for (const item of $("class-list").children) {
    const match = !q || item.dataset.class.toLowerCase().includes(q);
    item.hidden = !match;
    shown += match;
  }
  $("no-match").hidden = shown > 0;
  $("match-count").textContent = `${shown} shown`;
}

function updateCounts() {
  const names = [...state.selected];
  $("selected-count").textContent =
    `${names.length} selected` + (names.length ? `: ${names.join(", ")}` : "");
}

// ------------------------------------------------------------------ packing
async function pack() {
  clearError();
  const button = $("pack-button");
  const body = { classes: [...state.selected], k: Number($("k-select").value),
                 plan: $("plan-select").value };
  button.disabled = true;
  $("pack-status").textContent = `Packing ${body.classes.length} classes…`;
  const t0 = performance.now();
  try {
    const meta = await api("/v1/packs", { method: "POST", body: JSON.stringify(body),
                                          headers: { "Content-Type": "application/json" } });
    const seconds = (performance.now() - t0) / 1000;
    $("pack-status").textContent = "";
    showPack(meta, seconds);
  } catch (e) {
    $("pack-status").textContent = "";
    showError(e);
  } finally {
    button.disabled = false;
  }
}

function showPack(meta, answered = null) {
  state.pack = meta;
  $("pack-id").textContent = meta.id;
  $("pack-classes").textContent = meta.classes.join(", ");
  const params = $("pack-params");
  params.textContent = `${formatParams(meta.params)} parameters`;
  params.dataset.value = String(meta.params);
  params.title = `${meta.params.toLocaleString("en")} parameters when deployed`;
  $("pack-params-training").textContent = meta.params_training != null
    ? `(${formatParams(meta.params_training)} while packing)` : "";
  const acc = $("pack-accuracy");
  acc.textContent = percent(meta.fewshot_accuracy);
  acc.dataset.value = String(meta.fewshot_accuracy);
  $("pack-accuracy-samples").textContent = meta.fewshot_samples != null
    ? `${meta.fewshot_samples} few-shot samples (k = ${meta.k} per class)` : "the few-shot samples";
  $("pack-accuracy-method").textContent = meta.fewshot_accuracy_method || "";
  $("pack-time").textContent = (meta.cached ? "first built in " : "built in ") +
    `${meta.build_seconds.toFixed(1)} s (packing with its accuracy estimate ` +
    `${meta.pack_seconds.toFixed(1)} s)` +
    (answered != null ? `; this request took ${answered.toFixed(1)} s` : "");
  const cached = $("pack-cached");
  cached.textContent = meta.cached ? "yes: an existing pack answered this request"
                                   : "no: built for this request";
  cached.dataset.value = String(meta.cached);
  const rows = new Map();
  for (const c of (meta.plan && meta.plan.classes) || []) {
    for (const row of c.candidates || []) rows.set(row.key, { ...row, of: c.candidates.length });
  }
  $("pack-fragments").replaceChildren(...meta.fragments.map((f) => {
    const row = rows.get(f.key);
    const score = el("td", { class: "num", text: row ? row.score.toFixed(3) : "–" });
    if (row) score.title = `${row.source}${row.in_sample ? " (in sample: nobody else holds these samples)" : ""}`;
    return el("tr", {}, el("td", { text: f.class }), el("td", { text: f.model }),
              el("td", { class: "num", text: f.params.toLocaleString("en") }), score,
              el("td", { class: "num", text: row ? `${row.rank} of ${row.of}` : "–" }));
  }));
  for (const [id, name] of [["download-onnx", "model.onnx"], ["download-safetensors", "model.safetensors"],
                            ["download-spec", "spec.json"]]) {
    $(id).href = `/v1/packs/${meta.id}/${name}`;
    $(id).download = `${meta.id}-${name}`;
  }
  $("result").hidden = false;
  const images = meta.modality === "image";
  $("try").hidden = false;
  $("drop-zone").hidden = !images;
  $("text-pack-note").hidden = images;
  $("predictions").replaceChildren();
  $("predict-status").textContent = `Predictions use pack ${meta.id}.`;
}

// ------------------------------------------------------------------ predictions
async function predictFiles(files) {
  files = [...files].filter((f) => f.type === "" || f.type.startsWith("image/"));
  if (!state.pack || !files.length) return;
  clearError();
  const form = new FormData();
  for (const f of files) form.append("images", f, f.name);
  $("predict-status").textContent = `Predicting ${files.length} image${files.length === 1 ? "" : "s"}…`;
  try {
    // the header routes the request to a replica that already holds this pack (Serve multiplexing)
    const out = await api(`/v1/packs/${state.pack.id}/predict`, {
      method: "POST", body: form, headers: { serve_multiplexed_model_id: state.pack.id } });
    $("predictions").replaceChildren(...files.map((f, i) => predictionCard(f, out.predictions[i])));
    $("predict-status").textContent = `Pack ${out.id}: the most likely classes first.`;
  } catch (e) {
    $("predict-status").textContent = "";
    showError(e);
  }
}

function predictionCard(file, top) {
  const img = el("img", { class: "preview", alt: `preview of ${file.name}`, "data-testid": "image-preview" });
  img.src = URL.createObjectURL(file);
  img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
  const rows = top.map((p) => el("li", { class: "prediction", "data-testid": "prediction",
                                         "data-class": p.class, "data-probability": String(p.probability) },
    el("span", { class: "pred-class", text: p.class }),
    el("span", { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1",
                 "aria-valuenow": String(p.probability), "aria-label": `probability of ${p.class}` },
       el("span", { class: "fill", style: `width: ${(100 * p.probability).toFixed(1)}%` })),
    el("span", { class: "pred-prob", text: percent(p.probability) })));
  return el("figure", { class: "prediction-card", "data-testid": "prediction-card" }, img,
            el("figcaption", {}, el("span", { class: "file-name", text: file.name }),
               el("ol", { class: "prediction-list" }, ...rows)));
}

// ------------------------------------------------------------------ tabs
function showTab(which) {
  const developer = which === "developer";
  $("requester-panel").hidden = developer;
  $("developer-panel").hidden = !developer;
  $("tab-requester").setAttribute("aria-selected", String(!developer));
  $("tab-developer").setAttribute("aria-selected", String(developer));
  if (developer) loadModels();
}

// ------------------------------------------------------------------ developers: upload a model
const POLL_MS = 1000;
const FINAL = new Set(["ready", "failed"]);
const dev = { polling: null };

// A failed model's reason: the service's error type and message
function modelError(model) {
  const message = model.error || "the service gave no reason";
  return model.error_type ? `${model.error_type}: ${message}` : message;
}

function showUpload(model) {
  $("upload-progress-box").hidden = false;
  $("upload-model").textContent = model.id;
  const st = $("upload-state");
  st.textContent = model.state;
  st.dataset.state = model.state;
  st.className = `state-${model.state}`;
  const p = model.progress || {};
  const bar = $("upload-progress");
  if (p.total) {
    bar.max = p.total;
    bar.value = p.done || 0;
    $("upload-count").textContent = `${p.done || 0} of ${p.total} classes sliced`;
  } else {
    bar.removeAttribute("value");          // indeterminate while validating
    $("upload-count").textContent = "";
  }
  if (model.state === "ready") {
    bar.max = 1;
    bar.value = 1;
    $("upload-status").textContent =
      `Model ${model.id} is ready: requesters can pack its classes (${(model.classes || []).join(", ")}).`;
  } else if (model.state === "failed") {
    $("upload-status").textContent = "";
    showError(new Error(`Model ${model.id} failed: ${modelError(model)}`), "upload-error");
  } else {
    $("upload-status").textContent = `Checking and slicing ${model.id}…`;
  }
}

function stopPolling() {
  if (dev.polling) clearTimeout(dev.polling);
  dev.polling = null;
}

async function follow(id) {
  stopPolling();
  try {
    const { model } = await api(`/v1/models/${encodeURIComponent(id)}`);
    showUpload(model);
    if (FINAL.has(model.state)) {
      $("upload-button").disabled = false;
      loadModels();
      if (model.state === "ready") loadCatalogue();     // its classes join the catalogue
      return;
    }
  } catch (e) {
    $("upload-button").disabled = false;
    showError(e, "upload-error");
    return;
  }
  dev.polling = setTimeout(() => follow(id), POLL_MS);
}

async function upload(e) {
  e.preventDefault();
  clearBox("upload-error");
  const weights = $("model-weights").files[0];
  if (!weights) return;
  const classes = $("model-classes").value.split(",").map((c) => c.trim()).filter((c) => c);
  const spec = {
    arch: $("model-arch").value.trim(),
    classes: classes.map((c) => (/^\d+$/.test(c) ? Number(c) : c)),
    dataset: $("model-dataset").value.trim(),
    k: Number($("model-k").value),
    id: $("model-id").value.trim() || null,
    input_size: Number($("model-input-size").value),
    replace: $("model-replace").checked,
  };
  const form = new FormData();
  form.append("weights", weights, weights.name);
  form.append("spec", JSON.stringify(spec));
  const fewshot = $("model-fewshot").files[0];
  if (fewshot) form.append("fewshot", fewshot, fewshot.name);
  $("upload-button").disabled = true;
  $("upload-progress-box").hidden = true;
  $("upload-status").textContent = `Uploading ${weights.name} (${formatParams(weights.size)}B)…`;
  try {
    const { model } = await api("/v1/models", { method: "POST", body: form });
    showUpload(model);
    loadModels();
    follow(model.id);
  } catch (err) {
    $("upload-button").disabled = false;
    $("upload-status").textContent = "";
    showError(err, "upload-error");
  }
}

async function loadModels() {
  try {
    const { models } = await api("/v1/models");
    $("models-summary").textContent =
      `${models.length} model${models.length === 1 ? "" : "s"} you can see`;
    $("models-list").replaceChildren(...models.map(modelRow));
  } catch (e) {
    $("models-summary").textContent = "The model list did not load.";
    $("models-list").replaceChildren();
    showError(e, "upload-error");
  }
}

function modelRow(m) {
  const remove = el("button", { type: "button", class: "secondary", text: "Delete",
                                "data-testid": "model-delete", "aria-label": `delete ${m.id}` });
  remove.addEventListener("click", () => removeModel(m.id, remove));
  const p = m.progress || {};
  const state = m.state + (!FINAL.has(m.state) && p.total ? ` (${p.done || 0}/${p.total})` : "");
  const stateCell = el("td", { class: `state-${m.state}`, "data-testid": "model-state", text: state });
  if (m.state === "failed") stateCell.title = modelError(m);
  return el("tr", { "data-model": m.id, "data-testid": "model-row" },
            el("td", {}, el("code", { text: m.id })), el("td", { text: m.arch || "" }),
            el("td", { text: (m.classes || []).join(", ") }),
            el("td", { class: "num", text: m.params != null ? m.params.toLocaleString("en") : "–" }),
            el("td", { "data-testid": "model-owner", text: m.owner || "the operator" }),
            stateCell, el("td", {}, remove));
}

async function removeModel(id, button) {
  if (!window.confirm(`Remove ${id}, its fragments and the packs built on them?`)) return;
  clearBox("upload-error");
  button.disabled = true;
  try {
    const out = await api(`/v1/models/${encodeURIComponent(id)}`, { method: "DELETE" });
    const r = out.retired || {};
    const packs = Array.isArray(r.packs) ? r.packs.length : (r.packs || 0);
    $("upload-status").textContent =
      `Removed ${out.removed} with ${r.fragments || 0} fragments and ${packs} packs.`;
    loadCatalogue();
  } catch (e) {
    showError(e, "upload-error");
  } finally {
    loadModels();
  }
}

// ------------------------------------------------------------------ wiring
function wire() {
  $("token-form").addEventListener("submit", saveToken);
  $("token-forget").addEventListener("click", forgetToken);
  for (const id of ["download-onnx", "download-safetensors", "download-spec"]) {
    $(id).addEventListener("click", download);
  }
  $("class-search").addEventListener("input", filterClasses);
  $("clear-selection").addEventListener("click", () => {
    state.selected.clear();
    renderClasses();
    updateCounts();
  });
  $("pack-button").addEventListener("click", pack);
  $("tab-requester").addEventListener("click", () => { location.hash = ""; showTab("requester"); });
  $("tab-developer").addEventListener("click", () => { location.hash = "develop"; showTab("developer"); });
  $("upload-form").addEventListener("submit", upload);
  $("models-refresh").addEventListener("click", loadModels);
  $("image-input").addEventListener("change", (e) => {
    predictFiles(e.target.files);
    e.target.value = "";
  });
  const zone = $("drop-zone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    predictFiles(e.dataTransfer.files);
  });
  // A file dropped beside the zone would make the browser navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

document.addEventListener("DOMContentLoaded", () => {
  wire();
  showToken();
  updateCounts();
  loadCatalogue();
  if (location.hash === "#develop") showTab("developer");
});
