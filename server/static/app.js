// eDiff-I web UI: paint words of the prompt on a canvas, generate, watch progress.
// Plain browser JavaScript, no build step. Talks to the API of the same origin:
// POST /generate (Prefer: respond-async), GET /jobs/{id}/events (SSE read with fetch,
// so the API key header can be sent), GET /jobs/{id}, POST /jobs/{id}/cancel.
"use strict";

const N = 64; // the model's canvas (square); the colour map is sent at this size
// Region colours (distinct, never the white of unpainted pixels). A phrase naming a colour gets that one.
const PALETTE = {
  red: "#e6194b", blue: "#4363d8", green: "#3cb44b", orange: "#f58231",
  purple: "#911eb4", yellow: "#ffe119", cyan: "#42d4f4", magenta: "#f032e6",
};
const KEY_STORE = "ediffi.apiKey";
const HISTORY_STORE = "ediffi.history";
const HISTORY_MAX = 12;

const $ = (id) => document.getElementById(id);
const state = {
  words: [],          // [{text, start, end}] of the prompt
  sel: null,          // {start, end, anchor}: selected word indices (inclusive)
  regions: [],        // [{label, color, phrase, strength}]; label = value in `labels`
  active: null,       // label being painted
  labels: new Uint8Array(N * N), // per pixel: 0 = unpainted, else a region's label
  nextLabel: 1,
  style: null,        // {b64, dataUrl} of the style image
  init: null,         // {b64, dataUrl} of the init image (img2img)
  mask: null,         // {b64, dataUrl} of its mask (inpainting)
  strengths: null,    // GET /v1/models request.strength: {default, default_with_mask}
  job: null,          // the running job: {id, body, sent, colorMap, started}
  history: [],
  retry: null,        // action to rerun once an API key is entered
};

// ------------------------------------------------------------------ API access

class ApiError extends Error {
  constructor(status, body, headers) {
    super(typeof body?.detail === "string" ? body.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body;
    this.headers = headers;
  }
}

function authHeaders() {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, { method = "GET", body, headers = {} } = {}) {
  const init = { method, headers: { ...authHeaders(), ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, init);
  if (!res.ok) {
    let detail = null;
    try { detail = await res.json(); } catch { /* not JSON */ }
    throw new ApiError(res.status, detail, res.headers);
  }
  return res;
}

function needKey(err, retry) {
  if (!(err instanceof ApiError) || (err.status !== 401 && err.status !== 403)) return false;
  $("auth").hidden = false;
  $("auth-error").textContent = err.status === 403 ? "That key was not accepted." : "";
  $("api-key").focus();
  state.retry = retry;
  return true;
}

function saveKey() {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
  $("auth").hidden = true;
  const retry = state.retry;
  state.retry = null;
  if (retry) retry();
}

// Server-Sent Events from a fetch() body: calls onEvent(type, data) per event.
async function readEvents(res, onEvent) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // comment / keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = val;
        else if (field === "data") data.push(val);
      }
      if (!data.length) continue;
      let parsed = null;
      try { parsed = JSON.parse(data.join("\n")); } catch { parsed = data.join("\n"); }
      if (onEvent(type, parsed) === false) { reader.cancel(); return; }
    }
  }
}

// ------------------------------------------------------------ prompt and chips

function tokenize(prompt) {
  const words = [];
  for (const m of prompt.matchAll(/[\p{L}\p{N}_]+(?:['’-][\p{L}\p{N}_]+)*/gu)) {
    words.push({ text: m[0], start: m.index, end: m.index + m[0].length });
  }
  return words;
}

function escapeRegExp(s) { return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }

// First whole-word, case-insensitive occurrence, as the server locates phrases.
function phraseSpan(prompt, phrase) {
  const words = phrase.trim();
  if (!words) return null;
  const m = new RegExp(`(?<![\\p{L}\\p{N}_])${escapeRegExp(words)}(?![\\p{L}\\p{N}_])`, "iu").exec(prompt);
  return m ? [m.index, m.index + m[0].length] : null;
}

function selectedPhrase() {
  if (!state.sel) return "";
  const prompt = $("prompt").value;
  return prompt.slice(state.words[state.sel.start].start, state.words[state.sel.end].end);
}

function clickChip(i, shift) {
  const s = state.sel;
  if (s && shift) {
    state.sel = { start: Math.min(s.anchor, i), end: Math.max(s.anchor, i), anchor: s.anchor };
  } else if (s && (i === s.end + 1 || i === s.start - 1)) {
    state.sel = { start: Math.min(s.start, i), end: Math.max(s.end, i), anchor: s.anchor };
  } else if (s && s.start === i && s.end === i) {
    state.sel = null;
  } else {
    state.sel = { start: i, end: i, anchor: i };
  }
  renderChips();
}

function renderChips() {
  const prompt = $("prompt").value;
  state.words = tokenize(prompt);
  if (state.sel && state.sel.end >= state.words.length) state.sel = null;
  const box = $("chips");
  box.replaceChildren();
  // colour each word covered by a region's phrase
  const owner = new Array(state.words.length).fill(null);
  for (const r of state.regions) {
    const span = phraseSpan(prompt, r.phrase);
    if (!span) continue;
    state.words.forEach((w, k) => { if (w.start >= span[0] && w.end <= span[1]) owner[k] = r; });
  }
  state.words.forEach((w, k) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = w.text;
    chip.dataset.index = k;
    if (state.sel && k >= state.sel.start && k <= state.sel.end) chip.classList.add("selected");
    if (owner[k]) { chip.classList.add("painted"); chip.style.setProperty("--region", owner[k].color); }
    chip.addEventListener("click", (e) => clickChip(k, e.shiftKey));
    box.append(chip);
  });
  const phrase = selectedPhrase();
  const add = $("add-region");
  add.disabled = !phrase;
  add.textContent = phrase ? `Paint “${phrase}”` : "Select words to paint";
  renderRegions();
}

// --------------------------------------------------------------------- regions

function addRegion() {
  const phrase = selectedPhrase();
  if (!phrase) return;
  let region = state.regions.find((r) => r.phrase.toLowerCase() === phrase.toLowerCase());
  if (!region) {
    const used = new Set(state.regions.map((r) => r.color));
    const free = Object.entries(PALETTE).filter(([, c]) => !used.has(c));
    const named = free.find(([name]) => new RegExp(`\\b${name}\\b`, "i").test(phrase));
    const color = (named || free[0] || [])[1];
    if (!color) { showFormError(`At most ${Object.keys(PALETTE).length} regions.`); return; }
    region = { label: state.nextLabel++, color, phrase, strength: 0.4 };
    state.regions.push(region);
  }
  state.active = region.label;
  state.sel = null;
  $("eraser").checked = false;
  renderChips();
}

function removeRegion(label) {
  state.regions = state.regions.filter((r) => r.label !== label);
  for (let i = 0; i < state.labels.length; i++) if (state.labels[i] === label) state.labels[i] = 0;
  if (state.active === label) state.active = state.regions.length ? state.regions[0].label : null;
  renderChips();
  drawCanvas();
}

function pixelCount(label) {
  let n = 0;
  for (const v of state.labels) if (v === label) n++;
  return n;
}

function renderRegions() {
  const list = $("regions");
  list.replaceChildren();
  const prompt = $("prompt").value;
  for (const r of state.regions) {
    const li = document.createElement("li");
    li.className = "region" + (r.label === state.active ? " active" : "");
    li.dataset.label = r.label;
    li.dataset.phrase = r.phrase;
    li.style.setProperty("--region", r.color);
    const painted = pixelCount(r.label);
    li.innerHTML = `
      <label class="pick"><input type="radio" name="active-region"> <span class="swatch"></span>
        <span class="phrase"></span></label>
      <label class="strength">strength <input type="range" min="0" max="2" step="0.05">
        <output></output></label>
      <span class="count"></span>
      <button type="button" class="remove" title="Remove region">×</button>
      <p class="error" data-role="phrase"></p><p class="error" data-role="color"></p>
      <p class="error" data-role="strength"></p>`;
    li.querySelector(".phrase").textContent = r.phrase;
    const radio = li.querySelector("input[type=radio]");
    radio.checked = r.label === state.active;
    radio.addEventListener("change", () => { state.active = r.label; $("eraser").checked = false; renderRegions(); });
    const slider = li.querySelector("input[type=range]");
    slider.value = r.strength;
    li.querySelector("output").textContent = r.strength.toFixed(2);
    slider.addEventListener("input", () => {
      r.strength = Number(slider.value);
      li.querySelector("output").textContent = r.strength.toFixed(2);
    });
    li.querySelector(".count").textContent = painted ? `${painted} px` : "not painted (not sent)";
    li.querySelector(".remove").addEventListener("click", () => removeRegion(r.label));
    if (!phraseSpan(prompt, r.phrase)) li.querySelector("[data-role=phrase]").textContent = "not in the prompt any more";
    list.append(li);
  }
  $("regions-empty").hidden = state.regions.length > 0;
}

// ----------------------------------------------------------------------- brush

// The brush both canvases paint with (paint-with-words' colour map, inpainting's mask): strokes
// of discs into a grid {data, width, height} holding one value per canvas pixel, whatever size
// the canvas is shown at.

// A filled disc of `size` pixels across, centred at (cx, cy) in grid pixels: no antialiasing,
// so every pixel holds exactly one value. Returns the box it may have touched, [x0, y0, x1, y1].
function stamp(grid, cx, cy, size, value) {
  const r = size / 2;
  const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(grid.width - 1, Math.ceil(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(grid.height - 1, Math.ceil(cy + r));
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
      const inside = dx * dx + dy * dy <= r * r || (Math.floor(cx) === x && Math.floor(cy) === y);
      if (inside) grid.data[y * grid.width + x] = value;
    }
  }
  return [x0, y0, x1, y1];
}

// Paint strokes on `canvas` (pointer events: mouse, pen, touch) into `tool.grid()`:
//   size()    the brush's diameter in grid pixels (read at every move)
//   value()   what a stroke writes; null where nothing may be painted now (then refused() runs)
//   changed(box)  after each move, with the box of grid pixels it may have changed
//   ended()   once a stroke ends
function attachBrush(canvas, tool) {
  let last = null;   // the stroke's last point, null between strokes
  let grid = null, value = null;
  const toGrid = (e) => {
    const rect = canvas.getBoundingClientRect();
    return [(e.clientX - rect.left) / rect.width * grid.width, (e.clientY - rect.top) / rect.height * grid.height];
  };
  const paintTo = (p) => {
    const size = tool.size();
    const from = last || p;
    const dist = Math.hypot(p[0] - from[0], p[1] - from[1]);
    const steps = Math.max(1, Math.ceil(dist / Math.max(0.5, size / 4)));
    const box = [Infinity, Infinity, -Infinity, -Infinity];
    const grow = (b) => {
      box[0] = Math.min(box[0], b[0]); box[1] = Math.min(box[1], b[1]);
      box[2] = Math.max(box[2], b[2]); box[3] = Math.max(box[3], b[3]);
    };
    for (let k = 1; k <= steps; k++) {
      const t = k / steps;
      grow(stamp(grid, from[0] + (p[0] - from[0]) * t, from[1] + (p[1] - from[1]) * t, size, value));
    }
    if (!last) grow(stamp(grid, p[0], p[1], size, value));
    last = p;
    if (box[0] <= box[2] && box[1] <= box[3]) tool.changed(box);
  };
  canvas.addEventListener("pointerdown", (e) => {
    grid = tool.grid();
    value = grid ? tool.value() : null;
    if (value === null) { tool.refused?.(); return; }
    canvas.setPointerCapture(e.pointerId);
    last = null;
    paintTo(toGrid(e));
    e.preventDefault();
  });
  canvas.addEventListener("pointermove", (e) => { if (last) paintTo(toGrid(e)); });
  const stop = () => { if (last) { last = null; tool.ended(); } };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
}

// A range input whose value an <output> shows.
function followSlider(inputId, outputId) {
  $(inputId).addEventListener("input", () => { $(outputId).textContent = $(inputId).value; });
}

// ---------------------------------------------------------------------- canvas

function hexRgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

// The colour map as ImageData: exact region colours, `background` elsewhere.
function colorMapData(background) {
  const img = new ImageData(N, N);
  const rgb = new Map(state.regions.map((r) => [r.label, hexRgb(r.color)]));
  for (let i = 0; i < N * N; i++) {
    const c = rgb.get(state.labels[i]);
    const px = c ? [...c, 255] : background;
    img.data.set(px, i * 4);
  }
  return img;
}

function drawCanvas() {
  $("paint").getContext("2d").putImageData(colorMapData([0, 0, 0, 0]), 0, 0);
}

function setupCanvas() {
  attachBrush($("paint"), {
    grid: () => ({ data: state.labels, width: N, height: N }),
    size: () => Number($("brush-size").value),
    value: () => ($("eraser").checked ? 0 : state.active),
    refused: () => showFormError("Select words of the prompt and press “Paint …” first."),
    changed: () => drawCanvas(),
    ended: () => renderRegions(),
  });
  followSlider("brush-size", "brush-size-value");
  $("clear-canvas").addEventListener("click", () => { state.labels.fill(0); drawCanvas(); renderRegions(); });
}

function colorMapPng() {
  const c = document.createElement("canvas");
  c.width = c.height = N;
  c.getContext("2d").putImageData(colorMapData([255, 255, 255, 255]), 0, 0);
  return c.toDataURL("image/png");
}

// Restore a painting from a colour map PNG (history "reuse").
function loadColorMap(dataUrl) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = c.height = N;
      const ctx = c.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(img, 0, 0, N, N);
      const px = ctx.getImageData(0, 0, N, N).data;
      const byColor = new Map(state.regions.map((r) => [r.color, r.label]));
      for (let i = 0; i < N * N; i++) {
        const hex = "#" + [px[4 * i], px[4 * i + 1], px[4 * i + 2]].map((v) => v.toString(16).padStart(2, "0")).join("");
        state.labels[i] = byColor.get(hex) || 0;
      }
      resolve();
    };
    img.src = dataUrl;
  });
}

// ------------------------------------------------------- style and init images

// A file input with a preview and a Remove button; `key` is where state keeps {dataUrl, b64};
// `onLoaded(image)` runs once the preview has decoded a new file.
function setupImageInput(inputId, previewId, clearId, key, onLoaded = null) {
  const input = $(inputId);
  const set = (dataUrl) => {
    state[key] = dataUrl ? { dataUrl, b64: dataUrl.slice(dataUrl.indexOf(",") + 1) } : null;
    $(previewId).hidden = !dataUrl;
    $(clearId).hidden = !dataUrl;
    if (dataUrl) $(previewId).src = dataUrl; else $(previewId).removeAttribute("src");
  };
  if (onLoaded) $(previewId).addEventListener("load", () => onLoaded($(previewId)));
  input.addEventListener("change", () => {
    const file = input.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => set(reader.result);
    reader.readAsDataURL(file);
  });
  $(clearId).addEventListener("click", () => { input.value = ""; set(null); });
  return set;
}

let setStyle = () => {};  // set by init()
let setMask = () => {};   // set by init(): state.mask, its preview and Remove button

// ------------------------------------------------------------------ mask brush

// Inpainting's mask painted over the init image, one value per pixel of it (1: repainted, white in
// the PNG sent; 0: kept, black). It and an uploaded mask file are one mask: a file is loaded onto
// the canvas (replacing the painting), a stroke on it edits that, and state.mask (what is sent)
// becomes the painting's PNG at the init image's exact size once a stroke ends; nothing painted
// sends no mask.
const MASK_TINT = [58, 91, 217, 0.6]; // the page's accent, over the image where it is repainted
const maskPaint = {
  grid: null,       // {data: Uint8Array, width, height}: the init image's size; null without one
  base: null,       // the init image's pixels (ImageData)
  view: null,       // what the canvas shows: the image, tinted where painted (ImageData)
  committed: null,  // the data URL of the last painting sent: its preview loading is no upload
};

function imagePixels(image, width, height) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  const ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image, 0, 0, width, height);
  return ctx.getImageData(0, 0, width, height);
}

// Redraw the grid pixels in `box` ([x0, y0, x1, y1], inclusive; all of them without one).
function drawMask(box = null) {
  const { grid, base, view } = maskPaint;
  if (!grid) return;
  const [x0, y0, x1, y1] = box
    ? [Math.max(0, box[0]), Math.max(0, box[1]), Math.min(grid.width - 1, box[2]), Math.min(grid.height - 1, box[3])]
    : [0, 0, grid.width - 1, grid.height - 1];
  if (x0 > x1 || y0 > y1) return;
  const a = MASK_TINT[3];
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const i = y * grid.width + x, o = 4 * i;
      for (let c = 0; c < 3; c++) {
        view.data[o + c] = grid.data[i] ? base.data[o + c] * (1 - a) + MASK_TINT[c] * a : base.data[o + c];
      }
      view.data[o + 3] = 255;
    }
  }
  $("mask-canvas").getContext("2d").putImageData(view, 0, 0, x0, y0, x1 - x0 + 1, y1 - y0 + 1);
}

// The init image decoded: the canvas takes its size and shows it, with the mask there is.
function maskInitLoaded(image) {
  const width = image.naturalWidth, height = image.naturalHeight;
  if (!width || !height) { maskInitCleared(); return; }
  const canvas = $("mask-canvas");
  canvas.width = width;
  canvas.height = height;
  // shown in a 256 px box (small images enlarged without blur), its pixels square
  const scale = 256 / Math.max(width, height);
  canvas.style.width = `${width * scale}px`;
  canvas.style.height = `${height * scale}px`;
  maskPaint.base = imagePixels(image, width, height);
  maskPaint.view = new ImageData(width, height);
  maskPaint.grid = { data: new Uint8Array(width * height), width, height };
  const brush = $("mask-brush-size");
  brush.max = Math.max(4, Math.round(Math.max(width, height) / 4));
  brush.value = Math.max(1, Math.round(Math.max(width, height) / 16));
  $("mask-brush-size-value").textContent = brush.value;
  $("mask-painter").hidden = false;
  const preview = $("mask-preview");
  if (state.mask && preview.complete && preview.naturalWidth) maskFromImage(preview); else drawMask();
}

function maskInitCleared() {
  maskPaint.grid = maskPaint.base = maskPaint.view = null;
  $("mask-painter").hidden = true;
}

// An uploaded mask onto the canvas (the init image's size: another size is stretched to it, and
// says so; painting then sends one of the right size). White (grey >= 50%) is repainted.
function maskFromImage(image) {
  const { grid } = maskPaint;
  if (!grid) return;
  const px = imagePixels(image, grid.width, grid.height).data;
  for (let i = 0; i < grid.data.length; i++) {
    grid.data[i] = 0.299 * px[4 * i] + 0.587 * px[4 * i + 1] + 0.114 * px[4 * i + 2] >= 127.5 ? 1 : 0;
  }
  drawMask();
  const [w, h] = [image.naturalWidth, image.naturalHeight];
  const slot = document.querySelector('[data-error-for="mask"]');
  slot.textContent = w === grid.width && h === grid.height ? ""
    : `The mask is ${w}x${h}; it must be the init image's size, ${grid.width}x${grid.height} (paint on it to make one).`;
}

// The painting as the mask sent: a black and white PNG of the init image's size, or no mask.
function commitMask() {
  const { grid } = maskPaint;
  if (!grid) return;
  if (!grid.data.includes(1)) { clearMask(); return; }
  const img = new ImageData(grid.width, grid.height);
  for (let i = 0; i < grid.data.length; i++) {
    const v = grid.data[i] ? 255 : 0;
    img.data.set([v, v, v, 255], 4 * i);
  }
  const c = document.createElement("canvas");
  c.width = grid.width;
  c.height = grid.height;
  c.getContext("2d").putImageData(img, 0, 0);
  maskPaint.committed = c.toDataURL("image/png");
  $("mask-image").value = ""; // the file (if any) is replaced by its edit
  document.querySelector('[data-error-for="mask"]').textContent = "";
  setMask(maskPaint.committed);
  followMaskStrength();
}

// No mask: neither a file nor a painting.
function clearMask() {
  $("mask-image").value = "";
  setMask(null);
  if (maskPaint.grid) { maskPaint.grid.data.fill(0); drawMask(); }
  followMaskStrength();
}

function setupMaskPainter() {
  attachBrush($("mask-canvas"), {
    grid: () => maskPaint.grid,
    size: () => Number($("mask-brush-size").value),
    value: () => ($("mask-eraser").checked ? 0 : 1),
    changed: (box) => drawMask(box),
    ended: () => commitMask(),
  });
  followSlider("mask-brush-size", "mask-brush-size-value");
  $("clear-mask-paint").addEventListener("click", clearMask);
  $("clear-mask").addEventListener("click", clearMask);
  $("invert-mask").addEventListener("click", () => {
    if (!maskPaint.grid) return;
    maskPaint.grid.data.forEach((v, i, data) => { data[i] = v ? 0 : 1; });
    drawMask();
    commitMask();
  });
  $("init-preview").addEventListener("error", maskInitCleared);
  $("clear-init").addEventListener("click", maskInitCleared);
}

// ---------------------------------------------------------------------- errors

function clearErrors() {
  document.querySelectorAll(".error").forEach((el) => { if (el.id !== "auth-error") el.textContent = ""; });
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
}

function showFormError(msg) { $("form-error").textContent = msg; }

// Put an error next to the field `loc` names (["body", "paint_with_words", "regions", 0, "phrase"]).
// `sent` maps the index of a sent region back to its region.
function showFieldError(loc, msg, sent) {
  const path = loc[0] === "body" ? loc.slice(1) : loc;
  if (path[0] === "paint_with_words" && path[1] === "regions" && Number.isInteger(path[2])) {
    const region = sent[path[2]];
    const li = region && document.querySelector(`#regions li[data-label="${region.label}"]`);
    if (li) {
      const slot = li.querySelector(`[data-role="${path[3]}"]`) || li.querySelector("[data-role=phrase]");
      slot.textContent = msg;
      li.classList.add("invalid");
      return;
    }
  }
  for (let n = path.length; n > 0; n--) {
    const slot = document.querySelector(`[data-error-for="${path.slice(0, n).join(".")}"]`);
    if (slot) {
      slot.textContent = msg;
      if (["negative_prompt", "style_image", "init_image", "mask", "strength"].includes(path[0])) $("more").open = true;
      return;
    }
  }
  $("form-error").textContent += (loc.join(".") ? `${loc.join(".")}: ` : "") + msg + " ";
}

function showApiError(err, sent) {
  if (err instanceof ApiError && Array.isArray(err.body?.detail)) {
    for (const e of err.body.detail) showFieldError(e.loc || [], e.msg, sent);
    return;
  }
  let msg = err.message || String(err);
  const wait = err.headers?.get?.("Retry-After");
  if (wait) msg += ` (retry in ${wait} s)`;
  showFormError(msg);
}

// A failed job's reason: "invalid_input: paint_with_words.regions[0].phrase: message".
function showJobFailure(reason, sent) {
  const m = /^invalid[_ ]input:\s*([A-Za-z_][\w.[\]]*)\s*:\s*([\s\S]*)$/.exec(reason || "");
  if (!m) { showFormError(`Generation failed: ${reason || "unknown error"}`); return; }
  const loc = ["body"];
  for (const part of m[1].match(/[A-Za-z_]\w*|\[\d+\]/g)) loc.push(part[0] === "[" ? Number(part.slice(1, -1)) : part);
  showFieldError(loc, m[2], sent);
}

// ------------------------------------------------------------------ generation

function buildRequest() {
  const body = {
    prompt: $("prompt").value,
    n: 1,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    sampler: $("sampler").value,
    response_format: "url",
  };
  const negative = $("negative-prompt").value;
  if (negative) body.negative_prompt = negative;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (state.style) body.style_image = state.style.b64;
  if (state.init && !$("init-controls").hidden) {
    body.init_image = state.init.b64;
    if (state.mask && !$("mask-controls").hidden) body.mask = state.mask.b64;
    body.strength = Number($("strength").value);
  }
  for (const side of ["width", "height"]) {
    if (!$(`${side}-field`).hidden && $(side).value !== "") body[side] = Number($(side).value);
  }
  const sent = state.regions.filter((r) => pixelCount(r.label) > 0);
  let colorMap = null;
  if (sent.length) {
    colorMap = colorMapPng();
    body.paint_with_words = {
      color_map: colorMap.slice(colorMap.indexOf(",") + 1),
      regions: sent.map((r) => ({ color: r.color, phrase: r.phrase, strength: r.strength })),
    };
  }
  return { body, sent, colorMap };
}

function setProgress(stateName, step, total, text) {
  $("status").dataset.state = stateName;
  const bar = $("progress");
  bar.max = Math.max(1, total || 1);
  bar.value = Math.min(step || 0, bar.max);
  $("progress-text").textContent = text;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
}

async function generate() {
  clearErrors();
  if (state.job) return;
  const { body, sent, colorMap } = buildRequest();
  setBusy(true);
  setProgress("submitting", 0, body.steps, "submitting…");
  let accepted;
  try {
    const res = await api("/generate", { method: "POST", body, headers: { Prefer: "respond-async" } });
    accepted = await res.json();
  } catch (err) {
    setBusy(false);
    setProgress("idle", 0, 1, "idle");
    if (!needKey(err, generate)) showApiError(err, sent);
    return;
  }
  const job = { id: accepted.id, body, sent, colorMap, started: Date.now() };
  state.job = job;
  $("status").dataset.job = job.id;
  setProgress("queued", 0, body.steps, "queued");
  await follow(job);
}

// Follow the job's events until it ends, then fetch the result.
async function follow(job) {
  let terminal = false;
  try {
    const res = await api(`/jobs/${job.id}/events`, { headers: { Accept: "text/event-stream" } });
    await readEvents(res, (type, data) => {
      if (type === "progress") setProgress("running", data.step, data.total, `step ${data.step} / ${data.total}`);
      else if (type === "running") setProgress("running", 0, job.body.steps, "running");
      else if (type === "queued") setProgress("queued", 0, job.body.steps, "queued");
      else if (["succeeded", "failed", "canceled"].includes(type)) { terminal = true; return false; }
      return true;
    });
  } catch {
    // no stream (or it broke): poll the job below
  }
  let view;
  for (;;) {
    try {
      view = await (await api(`/jobs/${job.id}`)).json();
    } catch (err) {
      finishJob(job);
      showApiError(err, job.sent);
      return;
    }
    if (["succeeded", "failed", "canceled"].includes(view.status)) break;
    setProgress(view.status, view.progress.step, view.progress.total, view.status === "running"
      ? `step ${view.progress.step} / ${view.progress.total}` : view.status);
    await new Promise((r) => setTimeout(r, terminal ? 200 : 1000));
  }
  await showResult(job, view);
}

function finishJob(job) {
  if (state.job === job) state.job = null;
  setBusy(false);
}

async function blobToDataUrl(blob) {
  return new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(blob);
  });
}

async function showResult(job, view) {
  try {
    if (view.status === "failed") {
      setProgress("failed", 0, 1, "failed");
      showJobFailure(view.error, job.sent);
      return;
    }
    if (view.status === "canceled") {
      setProgress("canceled", 0, 1, "canceled");
      return;
    }
    const image = view.images[0];
    const blob = await (await api(image.url)).blob();
    const dataUrl = await blobToDataUrl(blob); // kept in the history (survives reloads, needs no key)
    const seconds = view.timings?.total_s ?? (Date.now() - job.started) / 1000;
    const entry = {
      id: job.id, image: dataUrl, seed: image.seed, seconds,
      prompt: job.body.prompt, negative_prompt: job.body.negative_prompt || "",
      steps: job.body.steps, guidance_scale: job.body.guidance_scale, sampler: job.body.sampler,
      width: job.body.width, height: job.body.height,
      regions: job.sent.map((r) => ({ color: r.color, phrase: r.phrase, strength: r.strength })),
      color_map: job.colorMap, style: Boolean(job.body.style_image),
      strength: job.body.init_image ? job.body.strength : null, masked: Boolean(job.body.mask),
    };
    const result = $("result");
    result.src = dataUrl;
    result.dataset.job = job.id;
    result.dataset.seed = image.seed;
    result.hidden = false;
    $("result-caption").textContent = describe(entry);
    setProgress("succeeded", job.body.steps, job.body.steps, `done in ${seconds.toFixed(1)} s (seed ${image.seed})`);
    state.history.unshift(entry);
    state.history = state.history.slice(0, HISTORY_MAX);
    saveHistory();
    renderHistory();
  } catch (err) {
    setProgress("failed", 0, 1, "failed");
    showApiError(err, job.sent);
  } finally {
    finishJob(job);
  }
}

async function cancel() {
  const job = state.job;
  if (!job) return;
  try {
    await api(`/jobs/${job.id}/cancel`, { method: "POST" });
    $("progress-text").textContent = "canceling…";
  } catch (err) {
    if (!needKey(err, cancel)) showApiError(err, job.sent);
  }
}

// --------------------------------------------------------------------- history

function describe(e) {
  const regions = e.regions.map((r) => `“${r.phrase}” ${r.strength.toFixed(2)}`).join(", ");
  return `${e.prompt} · steps ${e.steps} · guidance ${e.guidance_scale} · seed ${e.seed} · ${e.sampler}` +
    (e.width && e.height ? ` · ${e.width}x${e.height}` : "") +
    (regions ? ` · painted: ${regions}` : "") + (e.style ? " · style image" : "") +
    (e.strength ? ` · from an init image at strength ${e.strength}` : "") + (e.masked ? " · inpainted" : "") +
    (e.negative_prompt ? ` · not: ${e.negative_prompt}` : "");
}

function saveHistory() {
  try { localStorage.setItem(HISTORY_STORE, JSON.stringify(state.history)); } catch { /* storage full */ }
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const e of state.history) {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = e.image;
    img.alt = e.prompt;
    img.width = img.height = 96;
    const text = document.createElement("p");
    text.textContent = describe(e);
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Reuse";
    reuse.addEventListener("click", () => reuseEntry(e));
    img.addEventListener("click", () => {
      $("result").src = e.image;
      $("result").hidden = false;
      $("result-caption").textContent = describe(e);
    });
    li.append(img, text, reuse);
    list.append(li);
  }
}

async function reuseEntry(e) {
  $("prompt").value = e.prompt;
  $("negative-prompt").value = e.negative_prompt;
  $("steps").value = e.steps;
  $("guidance").value = e.guidance_scale;
  $("seed").value = e.seed;
  $("sampler").value = e.sampler;
  for (const side of ["width", "height"]) if (e[side] && !$(`${side}-field`).hidden) $(side).value = e[side];
  state.regions = e.regions.map((r, k) => ({ ...r, label: k + 1 }));
  state.nextLabel = state.regions.length + 1;
  state.active = state.regions.length ? 1 : null;
  state.labels.fill(0);
  if (e.color_map) await loadColorMap(e.color_map);
  state.sel = null;
  renderChips();
  drawCanvas();
}

// ------------------------------------------------------------------------ init

// Show only the controls the served model supports (GET /v1/models), set to its
// defaults: a model
// without an image encoder (an imported SD/SDXL) takes no style image; a model
// that makes more than one size (a latent one) gets width and height, starting
// at its default, in steps of the multiple it needs.
// A control the user changed before the listing arrived keeps their value.
function followMaskStrength() {
  const strengths = state.strengths;
  if (!strengths || $("strength").dataset.touched) return;
  $("strength").value = state.mask ? strengths.default_with_mask : strengths.default;
}

function setUntouched(control, value) {
  const untouched = control.tagName === "SELECT"
    ? control.selectedOptions[0]?.defaultSelected
    : control.value === control.defaultValue;
  if (untouched) control.value = value;
}

async function applyCapabilities() {
  try {
    const listing = await (await api("/v1/models")).json();
    const caps = listing.data[0].capabilities;
    if (!caps.style_image) {
      $("style-controls").hidden = true;
      setStyle(null);
    }
    // The model's defaults (an imported model's are its diffusers pipeline's) and the server's limits.
    const request = caps.request || {};
    if (request.steps) {
      $("steps").max = request.steps.max;
      setUntouched($("steps"), request.steps.default);
    }
    if (request.guidance_scale) setUntouched($("guidance"), request.guidance_scale.default);
    // Samplers only some models serve (ddim, pndm, ddpm: imported checkpoints' diffusers schedulers).
    const samplerControl = $("sampler");
    for (const name of caps.samplers || []) {
      if (![...samplerControl.options].some((option) => option.value === name)) {
        samplerControl.add(new Option(name, name));
      }
    }
    if (request.sampler) setUntouched(samplerControl, request.sampler.default);
    if (caps.init_image) {
      $("init-controls").hidden = false;
      // inpainting (a mask file or the mask brush) where the model takes a mask (absent: as img2img)
      $("mask-controls").hidden = caps.mask === false;
      if (request.strength) {
        state.strengths = request.strength;
        setUntouched($("strength"), request.strength.default);
      }
    }
    const sizes = caps.sizes;
    if (sizes && !sizes.fixed) {
      for (const [side, initial] of [["width", sizes.default_width], ["height", sizes.default_height]]) {
        const input = $(side);
        input.min = input.step = sizes.multiple_of;
        input.value = initial;
        $(`${side}-field`).hidden = false;
      }
    }
  } catch { /* keep the default controls: the API answers a wrong field with a 422 */ }
}

function init() {
  try { state.history = JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]"); } catch { state.history = []; }
  $("prompt").addEventListener("input", () => { state.sel = null; renderChips(); });
  $("add-region").addEventListener("click", addRegion);
  $("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("cancel").addEventListener("click", cancel);
  $("save-key").addEventListener("click", saveKey);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); saveKey(); } });
  $("key-button").addEventListener("click", () => {
    $("auth").hidden = !$("auth").hidden;
    $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  });
  setupCanvas();
  setStyle = setupImageInput("style-image", "style-preview", "clear-style", "style");
  // img2img makes the init image's size (rounded down to the model's multiple), as the API does
  // without a size: the width and height fields take it, and the user may still change them.
  setupImageInput("init-image", "init-preview", "clear-init", "init", (image) => {
    maskInitLoaded(image);
    for (const [side, pixels] of [["width", image.naturalWidth], ["height", image.naturalHeight]]) {
      const step = Number($(side).step) || 1;
      if (!$(`${side}-field`).hidden && pixels >= step) $(side).value = pixels - (pixels % step);
    }
  });
  // inpainting's own default strength (diffusers' inpaint pipelines': 1) while the user has not set one;
  // an uploaded file replaces the painting on the mask canvas (a painting's own preview does not)
  setMask = setupImageInput("mask-image", "mask-preview", "clear-mask", "mask", (image) => {
    if (image.src !== maskPaint.committed) maskFromImage(image);
    followMaskStrength();
  });
  setupMaskPainter(); // after setupImageInput: its Remove also clears the painting
  $("strength").addEventListener("input", () => { $("strength").dataset.touched = "1"; });
  applyCapabilities();
  renderChips();
  renderHistory();
  drawCanvas();
}

init();
