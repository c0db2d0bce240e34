// forethought viewer: one page, no build step. The server sends per-cell scalars for every metric in
// one response (rows x positions), and details only for the cell that is clicked.
"use strict";

const $ = (id) => document.getElementById(id);

// ---- colour maps (stops from matplotlib / ColorBrewer), interpolated linearly ------------------------
const MAPS = {
  viridis: ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"],
  magma: ["#2c115f", "#451077", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d", "#fcfdbf"],
  ylorrd: ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"],
};
const METRIC_MAP = { norm: "magma", lens: "viridis", change: "ylorrd", probe: "viridis" };
const RGB = {};
for (const [name, stops] of Object.entries(MAPS)) {
  RGB[name] = stops.map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
}
function colour(mapName, t) {
  const stops = RGB[mapName];
  const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  return stops[i].map((c, j) => Math.round(c + f * (stops[i + 1][j] - c)));
}
const css = (rgb) => `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
const darkText = (rgb) => 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140;

// ---- formatting ---------------------------------------------------------------------------------
function showToken(text) {
  return text
    .replace(/ /g, "·")
    .replace(/\n/g, "↵")
    .replace(/\t/g, "⇥")
    .replace(/[\x00-\x1f\x7f]/g, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
}
function exp(x) {
  const [m, e] = Number(x).toExponential(1).split("e");
  return `${m}e${e[0] === "-" ? "-" : "+"}${e.replace(/^[+-]/, "").padStart(2, "0")}`;
}
function num(x) {
  if (x === null || x === undefined) return "—";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return exp(x);
  return a >= 100 ? x.toFixed(1) : a >= 1 ? x.toFixed(3) : x.toFixed(4);
}
function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}
const pct = (p) => (p >= 0.0995 ? `${(100 * p).toFixed(0)}%` : p >= 0.001 ? `${(100 * p).toFixed(1)}%` : exp(p));
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ---- state --------------------------------------------------------------------------------------
const state = {
  info: null,
  session: null,
  tokens: [], // {id, text}
  nPrompt: 0,
  appendedFrom: null, // first appended position
  metrics: {}, // name -> [row][pos]
  lensTop1: [], // [row][pos]
  vocab: {},
  unchangedUpTo: 0, // columns 0..n-1 verified by the last append
  freshFrom: null,
  selected: null, // {row, pos}
  origins: null, // speculative: "draft" or "model" per generated token
  cells: [], // [row][pos] -> element
  busy: false,
};

function sessionId() {
  let id = sessionStorage.getItem("forethought-session");
  if (!id) {
    id = (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`).replace(/[^A-Za-z0-9_-]/g, "");
    sessionStorage.setItem("forethought-session", id.slice(0, 64));
  }
  return sessionStorage.getItem("forethought-session");
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error(`the server did not answer (${e.message}); is forethought view still running?`);
  }
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.classList.toggle("hidden", !message);
}

function setBusy(busy, label) {
  state.busy = busy;
  const has = state.tokens.length > 0;
  $("analyze").disabled = busy;
  $("analyze").textContent = busy && label === "analyze" ? "Running…" : "Analyze";
  for (const id of ["append-greedy", "append-sample", "append-typed", "append-text"]) $(id).disabled = busy || !has;
  document.body.style.cursor = busy ? "progress" : "";
}

// ---- model info and controls ---------------------------------------------------------------------
async function loadInfo() {
  const info = await api("/api/info");
  state.info = info;
  const c = info.config;
  $("model-info").textContent =
    `${info.model} · ${c.family} · ${c.n_layers} layers · d_model ${c.d_model} · ${c.n_heads} heads ` +
    `(${c.n_kv_heads} KV) · vocab ${c.vocab_size} · up to ${info.limits.max_tokens} tokens per session`;
  $("new-tokens").max = info.limits.max_new_tokens;
  const select = $("metric");
  select.innerHTML = "";
  for (const m of info.metrics) select.append(el("option", { value: m.id, text: m.label, title: m.description }));
  select.value = info.metrics.some((m) => m.id === "lens") ? "lens" : info.metrics[0].id;
  if (info.probe_note) $("legend-text").textContent = `future probes not loaded: ${info.probe_note}`;
  updateCache({ tokens: 0, bytes: 0, bytes_per_token: info.kv_bytes_per_token }, []);
}

function metricSpec(id) {
  return state.info.metrics.find((m) => m.id === id) || { id, label: id, range: null, description: "" };
}

// ---- grid ---------------------------------------------------------------------------------------
function scaleFor(metric, values) {
  // Returns a function (row, value) -> t in [0, 1], plus legend labels.
  const spec = metricSpec(metric);
  let mode = $("scale").value;
  if (mode === "auto") mode = metric === "norm" ? "row" : "grid";
  if (mode === "grid" && spec.range) {
    const [lo, hi] = spec.range;
    return { f: (r, v) => (v - lo) / (hi - lo), lo, hi, text: "fixed range" };
  }
  if (mode === "row") {
    const ranges = values.map((row) => {
      const xs = row.filter((v) => v !== null);
      return xs.length ? [Math.min(...xs), Math.max(...xs)] : [0, 1];
    });
    return {
      f: (r, v) => (v - ranges[r][0]) / (ranges[r][1] - ranges[r][0] || 1),
      lo: "row min", hi: "row max", text: "each layer scaled to its own min..max",
    };
  }
  // Whole grid: clip at the 1st / 99th percentile so one outlier (position 0 is often one) does not wash out the rest.
  const all = values.flat().filter((v) => v !== null).sort((a, b) => a - b);
  const q = (p) => (all.length ? all[Math.min(all.length - 1, Math.floor(p * (all.length - 1)))] : 0);
  const lo = all.length > 20 ? q(0.01) : q(0);
  const hi = all.length > 20 ? q(0.99) : q(1);
  return { f: (r, v) => (v - lo) / (hi - lo || 1), lo, hi, text: all.length > 20 ? "whole grid, 1st-99th percentile" : "whole grid" };
}

function drawLegend(metric, scale) {
  const canvas = $("legend-bar");
  const ctx = canvas.getContext("2d");
  const map = METRIC_MAP[metric] || "viridis";
  for (let x = 0; x < canvas.width; x++) {
    ctx.fillStyle = css(colour(map, x / (canvas.width - 1)));
    ctx.fillRect(x, 0, 1, canvas.height);
  }
  const label = (v) => (typeof v === "number" ? num(v) : v);
  $("legend-min").textContent = label(scale.lo);
  $("legend-max").textContent = label(scale.hi);
  $("legend-mid").textContent = typeof scale.lo === "number" ? label((scale.lo + scale.hi) / 2) : "";
  const spec = metricSpec(metric);
  let text = `${spec.description} · ${scale.text}`;
  if (metric === "change") text += " · hatched: position 0 has no previous position";
  if (metric === "probe") text += " · hatched: no probe for this layer";
  $("legend-text").textContent = text;
}

function renderGrid() {
  const grid = $("grid");
  const rows = state.info.rows;
  const n = state.tokens.length;
  grid.innerHTML = "";
  grid.style.gridTemplateColumns = `var(--label-w) repeat(${n}, var(--cell-w))`;
  grid.append(el("div", { class: "corner", text: "layer \\ token" }));
  state.tokens.forEach((tok, pos) => grid.append(tokenHeader(tok, pos)));
  state.cells = [];
  rows.forEach((label, r) => {
    grid.append(el("div", { class: "rowlabel", "data-row": r, text: label }));
    state.cells.push([]);
    for (let pos = 0; pos < n; pos++) {
      const cell = el("div", { class: "cell", "data-row": r, "data-pos": pos, role: "gridcell" });
      grid.append(cell);
      state.cells[r].push(cell);
    }
  });
  $("grid-empty").classList.add("hidden");
  $("grid-wrap").classList.remove("hidden");
  $("grid-foot").classList.remove("hidden");
  colourGrid();
}

function tokenHeader(tok, pos) {
  const kind = state.appendedFrom !== null && pos >= state.appendedFrom ? "appended" : pos >= state.nPrompt ? "generated" : "prompt";
  const classes = ["tok", kind];
  // Speculative decoding: a token the drafter proposed and the model accepted, vs one the model made itself.
  const origin = kind === "generated" && state.origins ? state.origins[pos - state.nPrompt] : null;
  if (origin === "draft") classes.push("drafted");
  if (pos < state.unchangedUpTo) classes.push("unchanged");
  if (state.freshFrom !== null && pos >= state.freshFrom) classes.push("fresh");
  const head = el("div", { class: classes.join(" "), "data-pos": pos, title: `position ${pos} · id ${tok.id} · ${kind}${origin ? ` · ${origin === "draft" ? "drafted, accepted" : "made by the model (verify step)"}` : ""}` });
  head.append(el("span", { class: "pos", text: String(pos) }), el("span", { class: "txt", text: showToken(tok.text) }));
  return head;
}

// Appending columns one at a time would re-flow the whole CSS grid anyway; rebuilding keeps it simple and
// stays well under a frame's budget for a few thousand cells.
function addColumns() {
  renderGrid();
  if (state.selected) select(state.selected.row, state.selected.pos, false);
  const wrap = $("grid-wrap");
  wrap.scrollLeft = wrap.scrollWidth;
}

function colourGrid() {
  if (!state.tokens.length) return;
  const metric = $("metric").value;
  const values = state.metrics[metric];
  if (!values) return;
  const scale = scaleFor(metric, values);
  const map = METRIC_MAP[metric] || "viridis";
  const showTokens = $("show-tokens").checked;
  state.cells.forEach((row, r) => {
    row.forEach((cell, pos) => {
      const v = values[r][pos];
      if (v === null || v === undefined) {
        cell.classList.add("nan");
        cell.style.background = "";
        cell.style.color = "";
      } else {
        const rgb = colour(map, scale.f(r, v));
        cell.classList.remove("nan");
        cell.style.background = css(rgb);
        cell.style.color = darkText(rgb) ? "#1d2330" : "#ffffff";
      }
      cell.textContent = showTokens ? showToken(state.vocab[state.lensTop1[r][pos]] ?? "") : "";
    });
  });
  drawLegend(metric, scale);
}

function cellTitle(r, pos) {
  const tok = state.tokens[pos];
  const top = state.lensTop1[r][pos];
  const parts = [`${state.info.rows[r]} · position ${pos} "${showToken(tok.text)}"`];
  parts.push(`logit-lens top-1: "${showToken(state.vocab[top] ?? "?")}" (${pct(state.metrics.lens[r][pos])})`);
  for (const m of state.info.metrics) {
    if (m.id !== "lens" && state.metrics[m.id]) parts.push(`${m.label}: ${num(state.metrics[m.id][r][pos])}`);
  }
  return parts.join("\n");
}

// ---- KV cache -----------------------------------------------------------------------------------
function updateCache(cache, history) {
  const limit = state.info ? state.info.limits.max_tokens : 0;
  $("cache-info").textContent =
    `${cache.tokens} tokens · ${bytes(cache.bytes)} · ${bytes(cache.bytes_per_token)}/token` +
    (limit ? ` · ${((100 * cache.tokens) / limit).toFixed(0)}% of ${limit}` : "");
  const canvas = $("cache-chart");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 320;
  const h = canvas.clientHeight || 70;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, h);
  const points = history.map((c) => [c.tokens, c.bytes]);
  const maxT = Math.max(8, ...points.map((p) => p[0]));
  const maxB = Math.max(cache.bytes_per_token * maxT, 1);
  const pad = { l: 4, r: 4, t: 14, b: 12 };
  const X = (t) => pad.l + ((w - pad.l - pad.r) * t) / maxT;
  const Y = (b) => h - pad.b - ((h - pad.t - pad.b) * b) / maxB;
  ctx.strokeStyle = "#d5d9e2";
  ctx.setLineDash([3, 3]);
  ctx.beginPath();
  ctx.moveTo(X(0), Y(0));
  ctx.lineTo(X(maxT), Y(maxB));
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = "#6b7385";
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillText(`${bytes(maxB)} at ${maxT} tokens (linear: bytes/token × tokens)`, pad.l, 10);
  ctx.fillText("tokens →", w - 52, h - 1);
  if (!points.length) return;
  ctx.strokeStyle = "#3b5bdb";
  ctx.fillStyle = "#3b5bdb";
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.moveTo(X(0), Y(0));
  for (const [t, b] of points) ctx.lineTo(X(t), Y(b));
  ctx.stroke();
  for (const [t, b] of points) {
    ctx.beginPath();
    ctx.arc(X(t), Y(b), 2.5, 0, 2 * Math.PI);
    ctx.fill();
  }
}

// ---- actions ------------------------------------------------------------------------------------
async function analyze(event) {
  event.preventDefault();
  if (state.busy) return;
  showError("");
  const seedText = $("seed").value.trim();
  const body = {
    session: state.session,
    prompt: $("prompt").value,
    new_tokens: Number($("new-tokens").value || 0),
    temperature: Number($("temperature").value || 0),
    top_k: Number($("top-k").value || 0),
    seed: seedText === "" ? null : Number(seedText),
    speculative: $("speculative").value || null,
  };
  setBusy(true, "analyze");
  try {
    const data = await api("/api/analyze", body);
    state.tokens = data.tokens;
    state.nPrompt = data.n_prompt;
    state.origins = data.speculative ? data.speculative.origins : null;
    state.appendedFrom = null;
    state.metrics = data.metrics;
    state.lensTop1 = data.lens_top1;
    state.vocab = data.vocab;
    state.unchangedUpTo = 0;
    state.freshFrom = null;
    state.selected = null;
    $("unchanged-badge").classList.add("hidden");
    $("cache-note").classList.add("hidden");
    renderGrid();
    updateCache(data.cache, data.cache_history);
    $("panel").innerHTML = "";
    $("panel").append(el("div", { class: "empty", text: "Click a cell to see what that state predicts and where its attention looked." }));
    const stop = data.stop_reason === "eos" ? " (stopped at end-of-text)" : "";
    const sp = data.speculative;
    const spec = sp
      ? ` · ${sp.drafter}: ${sp.origins.filter((o) => o === "draft").length} drafted tokens accepted, ${sp.forwards} verifying forwards, ${sp.tokens_per_forward.toFixed(2)} tokens/forward (underlined)`
      : "";
    $("cache-note").textContent = `${data.n_prompt} prompt + ${data.generated} generated tokens${stop}${spec} · ${data.timings.total_s.toFixed(2)} s`;
    $("cache-note").classList.remove("hidden");
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

async function append(mode) {
  if (state.busy || !state.tokens.length) return;
  showError("");
  const body = { session: state.session, mode };
  if (mode === "text") {
    body.text = $("append-text").value;
    if (!body.text) { showError("type the text to append first"); return; }
  }
  if (mode === "sample") {
    const t = Number($("temperature").value || 0);
    if (t > 0) body.temperature = t;
    body.top_k = Number($("top-k").value || 0);
  }
  setBusy(true, "append");
  try {
    const data = await api("/api/append", body);
    const start = data.start;
    state.tokens.push(...data.tokens);
    for (const [name, cols] of Object.entries(data.metrics)) {
      cols.forEach((row, r) => state.metrics[name][r].push(...row));
    }
    data.lens_top1.forEach((row, r) => state.lensTop1[r].push(...row));
    Object.assign(state.vocab, data.vocab);
    if (state.appendedFrom === null) state.appendedFrom = start;
    state.unchangedUpTo = start;
    state.freshFrom = start;
    addColumns();
    updateCache(data.cache, data.cache_history);
    const u = data.unchanged;
    const badge = $("unchanged-badge");
    const ok = u.max_abs_diff <= 1e-4;
    badge.className = `badge${ok ? "" : " warn"}`;
    badge.textContent = `✓ columns 0..${start - 1} ${ok ? "unchanged" : "CHANGED"} (max |diff| ${exp(u.max_abs_diff)})`;
    badge.title =
      "The server re-ran the whole sequence from scratch and compared every earlier column, at every layer, " +
      "with the states of the previous response. Causal attention never lets a later token change an earlier column" +
      (u.identical ? ": here they are bit-for-bit identical." : "; what remains is float32 rounding from matrix shapes.");
    const chosen = data.chosen_prob === null ? "" : ` · p(chosen) ${pct(data.chosen_prob)}`;
    $("cache-note").textContent =
      `+${data.tokens.map((t) => `"${showToken(t.text)}"`).join(" ")}${chosen} · new column via KV cache vs recompute: ` +
      `max |diff| ${exp(data.cache_vs_recompute)}`;
    $("cache-note").title = "The new column was computed from the session's KV cache (one token through the network) " +
      "and again by recomputing the whole sequence: the cache is a memory/compute trade, not a different model.";
    $("cache-note").classList.remove("hidden");
    if (mode === "text") $("append-text").value = "";
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

function select(row, pos, load = true) {
  document.querySelectorAll(".sel").forEach((node) => node.classList.remove("sel"));
  const cell = state.cells[row] && state.cells[row][pos];
  if (!cell) return;
  cell.classList.add("sel");
  document.querySelector(`.rowlabel[data-row="${row}"]`)?.classList.add("sel");
  document.querySelector(`.tok[data-pos="${pos}"]`)?.classList.add("sel");
  state.selected = { row, pos };
  if (load) loadCell(row, pos);
}

let cellRequest = 0;
async function loadCell(row, pos) {
  const panel = $("panel");
  const ticket = ++cellRequest;
  panel.innerHTML = "";
  panel.append(el("div", { class: "loading", text: `loading ${state.info.rows[row]} · position ${pos}…` }));
  try {
    const q = new URLSearchParams({ session: state.session, row, position: pos, k: 10 });
    const data = await api(`/api/cell?${q}`);
    if (ticket === cellRequest) renderPanel(data);
  } catch (e) {
    if (ticket === cellRequest) {
      panel.innerHTML = "";
      panel.append(el("div", { class: "alert", text: e.message }));
    }
  }
}

function bars(items, hitId) {
  const list = el("ul", { class: "bars" });
  const max = Math.max(...items.map((i) => i.prob), 1e-9);
  for (const item of items) {
    const bar = el("span");
    bar.style.width = `${(100 * item.prob) / max}%`;
    const li = el(
      "li",
      { class: item.id === hitId ? "hit" : "", title: `id ${item.id}: ${item.prob}` },
      el("span", { class: "t", text: item.label ?? showToken(item.text) }),
      el("span", { class: "b" }, bar),
      el("span", { class: "p", text: pct(item.prob) }),
    );
    list.append(li);
  }
  return list;
}

function renderPanel(d) {
  const panel = $("panel");
  panel.innerHTML = "";
  panel.append(el("h3", { text: `${d.row_label} · position ${d.position} · "${showToken(d.token.text)}"` }));
  const values = Object.entries(d.values).map(([k, v]) => `${k} ${num(v)}`).join(" · ");
  panel.append(el("div", { class: "values", text: `${d.name} · ${values}` }));

  panel.append(el("h4", { text: `logit lens: top ${d.lens.length} next tokens` }));
  panel.append(bars(d.lens, d.following ? d.following.id : null));
  if (d.following) {
    panel.append(el("div", {
      class: "following",
      text: `token that actually came next: "${showToken(d.following.text)}" · p ${pct(d.following.prob)} · rank ${d.following.rank}`,
    }));
  }

  if (d.probes) {
    panel.append(el("h4", { text: `future probes: the token k = ${d.probes[0].k}..${d.probes[d.probes.length - 1].k} ahead` }));
    for (const p of d.probes) {
      const block = el("div", { class: "probe-k" }, el("span", { class: "k", text: `k = ${p.k} · token probe` }));
      block.append(bars(p.top.slice(0, 5), null));
      const lens = p.lens.slice(0, 4).map((t) => `"${showToken(t.text)}" ${pct(t.prob)}`).join(" · ");
      block.append(el("div", { class: "following", text: `Future Lens: ${lens}` }));
      panel.append(block);
    }
  }

  panel.append(el("h4", { text: d.attention ? `attention of layer ${d.attention.layer}: position ${d.position} → 0..${d.position}` : "attention" }));
  if (!d.attention) {
    panel.append(el("div", { class: "note", text: d.attention_note || "no attention for this row" }));
    return;
  }
  const a = d.attention;
  const keys = a.mean.map((w, i) => ({
    id: i, prob: w, label: `${String(i).padStart(3)} ${state.tokens[i] ? showToken(state.tokens[i].text) : ""}`,
  }));
  const shown = keys.length <= 16 ? keys : [...keys].sort((x, y) => y.prob - x.prob).slice(0, 12);
  panel.append(el("div", { class: "following", text: keys.length <= 16 ? "mean over heads, per earlier position" : "mean over heads: the 12 positions it looked at most" }));
  panel.append(bars(shown, null));
  panel.append(heatmap(a));
}

function heatmap(a) {
  const wrap = el("div");
  const rows = [...a.heads, a.mean];
  const labels = [...a.heads.map((_, h) => `head ${h}`), "mean"];
  const canvas = el("canvas", { class: "attn-heat", id: "attention" });
  canvas.width = a.keys;
  canvas.height = rows.length;
  canvas.style.height = `${Math.min(12 * rows.length, 160)}px`;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(a.keys, rows.length);
  rows.forEach((row, r) => {
    const max = Math.max(...row, 1e-9);
    row.forEach((w, k) => {
      const rgb = colour("viridis", w / max);
      const o = 4 * (r * a.keys + k);
      image.data.set([...rgb, 255], o);
    });
  });
  ctx.putImageData(image, 0, 0);
  const hover = el("div", { class: "attn-hover", text: " " });
  canvas.addEventListener("mousemove", (e) => {
    const box = canvas.getBoundingClientRect();
    const k = Math.floor(((e.clientX - box.left) / box.width) * a.keys);
    const r = Math.floor(((e.clientY - box.top) / box.height) * rows.length);
    if (rows[r] && k >= 0 && k < a.keys) {
      const tok = state.tokens[k] ? showToken(state.tokens[k].text) : "";
      hover.textContent = `${labels[r]} → position ${k} "${tok}": ${num(rows[r][k])}`;
    }
  });
  wrap.append(
    el("div", { class: "attn-caption" }, el("span", { text: `rows: ${a.n_heads} heads, then the mean` }), el("span", { text: "each row scaled to its max" })),
    canvas,
    el("div", { class: "attn-caption" }, el("span", { text: "position 0" }), el("span", { text: `position ${a.keys - 1}` })),
    hover,
  );
  return wrap;
}

// ---- wiring -------------------------------------------------------------------------------------
function wire() {
  $("analyze-form").addEventListener("submit", analyze);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) analyze(e);
  });
  $("append-greedy").addEventListener("click", () => append("greedy"));
  $("append-sample").addEventListener("click", () => append("sample"));
  $("append-typed").addEventListener("click", () => append("text"));
  $("append-text").addEventListener("keydown", (e) => {
    if (e.key === "Enter") append("text");
  });
  $("metric").addEventListener("change", colourGrid);
  $("scale").addEventListener("change", colourGrid);
  $("show-tokens").addEventListener("change", colourGrid);
  const grid = $("grid");
  grid.addEventListener("click", (e) => {
    const cell = e.target.closest(".cell");
    if (cell) select(Number(cell.dataset.row), Number(cell.dataset.pos));
  });
  grid.addEventListener("mouseover", (e) => {
    const cell = e.target.closest(".cell");
    if (cell && !cell.title) cell.title = cellTitle(Number(cell.dataset.row), Number(cell.dataset.pos));
  });
}

async function main() {
  state.session = sessionId();
  wire();
  setBusy(false);
  try {
    await loadInfo();
  } catch (e) {
    showError(e.message);
  }
}

main();
