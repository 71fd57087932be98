// The page of lit_jax serve: plain JS over the JSON API (lit_jax/serve/app.py). No external downloads.
"use strict";

const $ = (id) => document.getElementById(id);
let pending = 0, busySince = 0, busyTimer = null;
let current = null;  // {key, read_id, tokens}
let info = null;

function setBusy(delta) {
  pending += delta;
  $("busy").hidden = pending === 0;
  if (pending > 0 && !busyTimer) {
    busySince = Date.now();
    busyTimer = setInterval(() => {
      const s = ((Date.now() - busySince) / 1000).toFixed(0);
      $("busy-text").textContent = `Working… ${s} s (the first request of a shape compiles)`;
    }, 500);
  } else if (pending === 0 && busyTimer) {
    clearInterval(busyTimer); busyTimer = null; $("busy-text").textContent = "Working…";
  }
}

function showError(message) { $("error").textContent = message; $("error").hidden = false; }
function clearError() { $("error").hidden = true; $("error").textContent = ""; }

class ApiError extends Error {
  constructor(message, field) { super(message); this.field = field; }
}

async function api(path, body) {
  setBusy(1);
  try {
    const res = await fetch(path, body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) throw new ApiError((data && data.error) || `HTTP ${res.status}`, data && data.field);
    return data;
  } finally { setBusy(-1); }
}

// ---------------------------------------------------------------- the read

function addTurn(role, content) {
  const div = document.createElement("div");
  div.className = "turn";
  const sel = document.createElement("select");
  for (const r of ["system", "user", "assistant"]) sel.add(new Option(r, r, false, r === role));
  const ta = document.createElement("textarea");
  ta.rows = 2; ta.value = content || "";
  const rm = document.createElement("button");
  rm.type = "button"; rm.textContent = "×"; rm.title = "remove this turn";
  rm.onclick = () => div.remove();
  div.append(sel, ta, rm);
  $("turns").append(div);
}

function readRequest() {
  const req = {};
  if ($("mode-text").checked) {
    req.text = $("text").value;
  } else {
    req.dialog = [...document.querySelectorAll("#turns .turn")].map((t) => ({
      role: t.querySelector("select").value, content: t.querySelector("textarea").value}));
    req.read_from_turn = parseInt($("from-turn").value || "0", 10);
  }
  for (const [id, key] of [["span-start", "span_start"], ["span-end", "span_end"]]) {
    const v = $(id).value.trim();
    if (v !== "") req[key] = parseInt(v, 10);
  }
  return req;
}

function renderTokens(tokens) {
  const box = $("tokens");
  box.textContent = "";
  $("token-ask").hidden = true;
  for (const t of tokens) {
    const cell = document.createElement("span");
    cell.className = "tok" + (t.in_span ? " span" : "");
    cell.dataset.index = t.index;
    cell.textContent = t.text;
    cell.title = `token ${t.index}`;
    if (t.in_span) cell.onclick = () => selectToken(cell);
    box.append(cell);
  }
}

async function ensureRead(force) {
  const req = readRequest();
  const key = JSON.stringify(req);
  if (!force && current && current.key === key) return current;
  const data = await api("/api/read", req);
  current = {key, read_id: data.read_id, tokens: data.tokens};
  renderTokens(data.tokens);
  return current;
}

// Runs fn(read) on the current read; a read the server has dropped is read again once.
async function withRead(fn) {
  const read = await ensureRead(false);
  try { return await fn(read); } catch (e) {
    if (e.field === "read_id" && /unknown or expired/.test(e.message)) return fn(await ensureRead(true));
    throw e;
  }
}

function layerArg() {
  const v = $("layer").value;
  return v === "" ? {} : {layer: parseInt(v, 10)};
}

// ---------------------------------------------------------------- actions

async function action(fn) {
  clearError();
  try { await fn(); } catch (e) { showError(e.message); }
}

function selectToken(cell) {
  document.querySelectorAll(".tok.selected").forEach((c) => c.classList.remove("selected"));
  cell.classList.add("selected");
  $("token-label").textContent = JSON.stringify(cell.textContent) + ` (#${cell.dataset.index})`;
  $("token-ask").dataset.index = cell.dataset.index;
  $("token-answer").textContent = "";
  $("token-ask").hidden = false;
}

async function askAboutToken() {
  const token = parseInt($("token-ask").dataset.index, 10);
  const data = await withRead((read) => api("/api/ask", {
    read_id: read.read_id, questions: [$("token-question").value], token, ...layerArg()}));
  $("token-answer").textContent = data.answers[0].answer || "(empty answer)";
}

async function ask() {
  const questions = $("questions").value.split("\n").map((q) => q.trim()).filter((q) => q);
  if (!questions.length) throw new ApiError("questions: write at least one question", "questions");
  const data = await withRead((read) => api("/api/ask", {read_id: read.read_id, questions, ...layerArg()}));
  const list = $("answers");
  list.textContent = "";
  for (const a of data.answers) {
    const li = document.createElement("li");
    const q = document.createElement("div"); q.className = "question"; q.textContent = a.question;
    const ans = document.createElement("div"); ans.className = "answer"; ans.textContent = a.answer || "(empty answer)";
    li.append(q, ans);
    list.append(li);
  }
}

function colour(p) {  // 0 -> blue, 0.5 -> white, 1 -> red
  const lo = [59, 130, 246], hi = [220, 38, 38], t = Math.abs(p - 0.5) * 2, end = p >= 0.5 ? hi : lo;
  const c = end.map((v) => Math.round(255 + (v - 255) * t));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

async function colourTokens() {
  const data = await withRead((read) => api("/api/token_scores", {
    read_id: read.read_id, question: $("yesno-question").value, ...layerArg()}));
  document.querySelectorAll(".tok.scored").forEach((c) => {
    c.classList.remove("scored"); c.style.background = ""; delete c.dataset.p; });
  for (const s of data.scores) {
    const cell = document.querySelector(`#tokens .tok[data-index="${s.index}"]`);
    cell.classList.add("scored");
    cell.dataset.p = s.p_yes.toFixed(4);
    cell.style.background = colour(s.p_yes);
    cell.title = `token ${s.index}: P(Yes) = ${s.p_yes.toFixed(3)}`;
  }
}

async function steer() {
  const name = $("steering").value;
  if (!name) throw new ApiError("steering: none loaded (start the server with --config.serve.steering)", "steering");
  $("plain").textContent = ""; $("steered").textContent = "";
  const data = await api("/api/steer", {prompt: $("steer-prompt").value, steering: name});
  $("steered-name").textContent = data.steering;
  $("plain").textContent = data.plain || "(empty)";
  $("steered").textContent = data.steered || "(empty)";
}

// ---------------------------------------------------------------- start

function showInfo(d) {
  const rows = [
    ["base model", d.base_model], ["decoder", d.decoder],
    ["target", `${d.num_layers} layers, hidden size ${d.hidden_size}`],
    ["trained read layers", d.read_layers.join(", ") + (d.read_all_layers ? " (all at once)" : "")],
    ["write", `after block ${d.write_layer}, mode ${d.write_mode}, projection ${d.projection}`],
    ["adapters", d.full_finetune ? "full fine-tune" : `LoRA rank ${d.lora.rank}, alpha ${d.lora.alpha}`],
    ["training steps", `${d.training_steps ?? "?"} configured; checkpoint step ${d.checkpoint_step}`],
    ["steering loaded", Object.keys(d.steering).join(", ") || "none"],
    ["limits", Object.entries(d.limits).map(([k, v]) => `${k}=${v}`).join(", ")],
  ];
  const table = $("info");
  table.textContent = "";
  for (const [k, v] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = String(v);
  }
  const layer = $("layer");
  layer.textContent = "";
  if (d.read_all_layers) layer.add(new Option(`all (${d.read_layers.join(", ")})`, ""));
  else d.read_layers.forEach((l, i) => layer.add(new Option(String(l), String(l), i === 0, i === 0)));
  const steering = $("steering");
  steering.textContent = "";
  for (const name of Object.keys(d.steering)) steering.add(new Option(name, name));
  if (!steering.options.length) steering.add(new Option("(none loaded)", ""));
}

function init() {
  addTurn("system", "You are a pirate. Answer like one.");
  addTurn("user", "Hi! What should I do this weekend?");
  $("add-turn").onclick = () => addTurn("user", "");
  const mode = () => { const text = $("mode-text").checked; $("text-box").hidden = !text; $("dialog-box").hidden = text; };
  $("mode-dialog").onchange = mode; $("mode-text").onchange = mode;
  $("read-btn").onclick = () => action(() => ensureRead(true));
  $("ask-btn").onclick = () => action(ask);
  $("token-ask-btn").onclick = () => action(askAboutToken);
  $("colour-btn").onclick = () => action(colourTokens);
  $("steer-btn").onclick = () => action(steer);
  action(async () => { info = await api("/api/info"); showInfo(info); });
}

init();
