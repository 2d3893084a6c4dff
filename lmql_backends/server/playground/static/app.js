"use strict";
// The playground page: POST /v1/queries, read its server-sent events, show the decoding.
const $ = (id) => document.getElementById(id);
const STORE = "lmql-backends.playground.";
const EXAMPLE = 'argmax\n    "Q: What is the capital of France?\\n"\n    "A: [ANSWER]"\nwhere\n    STOPS_AT(ANSWER, "\\n") and len(TOKENS(ANSWER)) < 20';
let controller = null;
let tokens = [];
let lastToken = null;

function pct(logprob) {
  return logprob === null ? "0 %" : (100 * Math.exp(logprob)).toPrecision(3) + " %";
}
function visible(text) {
  return JSON.stringify(text).slice(1, -1);
}
function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function decoderArgs() {
  const name = $("dec-name").value;
  const args = { name, max_len: Number($("dec-max_len").value) };
  if (name === "sample") {
    args.temperature = Number($("dec-temperature").value);
    args.seed = Number($("dec-seed").value);
  }
  return args;
}

function saveInputs() {
  localStorage.setItem(STORE + "query", $("query").value);
  for (const id of ["dec-name", "dec-temperature", "dec-seed", "dec-max_len", "top-k"]) {
    localStorage.setItem(STORE + id, $(id).value);
  }
}
function restoreInputs() {
  $("query").value = localStorage.getItem(STORE + "query") ?? EXAMPLE;
  for (const id of ["dec-name", "dec-temperature", "dec-seed", "dec-max_len", "top-k"]) {
    const value = localStorage.getItem(STORE + id);
    if (value !== null) $(id).value = value;
  }
  $("api-key").value = sessionStorage.getItem(STORE + "api-key") ?? "";
}

function reset() {
  tokens = [];
  lastToken = null;
  $("trace").replaceChildren();
  for (const id of ["inspector", "error", "result"]) { $(id).hidden = true; $(id).replaceChildren(); }
}

function setRunning(running, status) {
  $("run").disabled = running;
  $("stop").disabled = !running;
  $("status").textContent = status;
}

async function run() {
  saveInputs();
  reset();
  controller = new AbortController();
  setRunning(true, "running…");
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  sessionStorage.setItem(STORE + "api-key", key);
  if (key) headers["Authorization"] = "Bearer " + key;
  const body = { query: $("query").value, decoder: decoderArgs(), top_k: Number($("top-k").value) };
  let ended = false;
  try {
    const response = await fetch("/v1/queries", { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const data = await response.json().catch(() => ({ error: { message: response.statusText } }));
      showError({ ...data.error, type: "HTTP " + response.status });
      setRunning(false, "failed");
      return;
    }
    await readEvents(response.body, (kind, data) => { if (handle(kind, data)) ended = true; });
    setRunning(false, ended ? $("status").textContent : "the server closed the stream early");
  } catch (err) {
    if (err.name === "AbortError") setRunning(false, "stopped");
    else { showError({ message: String(err), type: "network" }); setRunning(false, "failed"); }
  } finally {
    controller = null;
  }
}

function stop() {
  if (controller) controller.abort();
}

async function readEvents(stream, onEvent) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(kind, data ? JSON.parse(data) : {});
    }
  }
}

// returns true when the query has ended (result or error)
function handle(kind, data) {
  if (kind === "prompt") $("trace").append(el("span", { class: "prompt" }, data.text));
  else if (kind === "token") addToken(data);
  else if (kind === "variable_end") endVariable(data);
  else if (kind === "result") { showResult(data); setRunning(true, "done"); return true; }
  else if (kind === "error") { showError(data); setRunning(true, "failed"); return true; }
  return false;
}

function addToken(t) {
  const index = tokens.length;
  tokens.push(t);
  if (t.best_masked) {
    const masked = el("s", { class: "masked", title: "the model preferred this token; the constraints removed it" }, t.best_masked.text);
    $("trace").append(masked);
  }
  const span = el("span", {
    class: "tok" + (t.num_allowed === 1 ? " forced" : ""),
    "data-token-id": t.token_id,
    "data-logprob": t.logprob === null ? "-inf" : t.logprob,
    "data-index": index,
    title: `p = ${pct(t.logprob)}`,
  }, t.is_eos ? "⏎EOS" : t.text);
  span.style.setProperty("--p", t.logprob === null ? 0 : Math.exp(t.logprob));
  span.addEventListener("mouseenter", () => inspect(index));
  span.addEventListener("click", () => inspect(index));
  $("trace").append(span);
  lastToken = span;
}

function endVariable(data) {
  if (lastToken === null) return;
  tokens[Number(lastToken.dataset.index)].end = data;
  lastToken.after(el("span", { class: "end", title: data.description }, "end: " + data.reason + " (" + data.variable + ")"));
}

function inspect(index) {
  const t = tokens[index];
  document.querySelectorAll(".tok.sel").forEach((n) => n.classList.remove("sel"));
  document.querySelector(`.tok[data-index="${index}"]`).classList.add("sel");
  const box = $("inspector");
  box.hidden = false;
  box.replaceChildren();
  const line = (label, value) => { const p = el("div", { class: "kv" }, label + " "); p.append(el("b", {}, value)); box.append(p); };
  line("token", `${visible(t.text)} (id ${t.token_id})`);
  line("probability", `${pct(t.logprob)} under the constraints; ${pct(t.model_logprob)} for the model`);
  line("allowed by the constraints", `${t.num_allowed} of ${t.num_tokens} tokens`);
  if (t.best_masked) line("best token the mask removed", `${visible(t.best_masked.text)} (${pct(t.best_masked.logprob)})`);
  if (t.end) line("stop", t.end.description);
  const table = el("table");
  for (const alt of t.top) {
    const row = el("tr", alt.token_id === t.token_id ? { class: "chosen" } : {});
    row.append(el("td", alt.is_allowed ? {} : { class: "no", title: "removed by the constraints" }, visible(alt.text)));
    const bar = el("td");
    const fill = el("i");
    fill.style.width = (Math.exp(alt.logprob) * 10).toFixed(2) + "rem";
    bar.append(fill);
    row.append(bar, el("td", {}, pct(alt.logprob)));
    table.append(row);
  }
  box.append(el("div", { class: "kv" }, "the model's top alternatives (struck through: removed by the constraints):"), table);
}

function showResult(r) {
  const box = $("result");
  box.hidden = false;
  box.append(el("h2", {}, "Variables"));
  const table = el("table");
  const head = el("tr");
  head.append(el("th", {}, "variable"), el("th", {}, "value"));
  table.append(head);
  for (const [name, value] of Object.entries(r.variables)) {
    const row = el("tr");
    const cell = el("td", { class: "value", "data-variable": name }, value === null ? "None" : String(value));
    row.append(el("td", {}, name), cell);
    table.append(row);
    if (r.distributions[name]) {
      const bars = el("td");
      for (const [option, p] of r.distributions[name]) {
        const bar = el("div", { class: "bar" });
        const fill = el("i");
        fill.style.width = (p * 12).toFixed(2) + "rem";
        bar.append(fill, el("span", {}, `${(100 * p).toFixed(1)} %  ${visible(option)}`));
        bars.append(bar);
      }
      const dist = el("tr");
      dist.append(el("td", {}, `P(${name})`), bars);
      table.append(dist);
    }
  }
  box.append(table);
  const stats = el("div", { class: "stats" });
  const stat = (label, value) => { const s = el("span", {}, label + " "); s.append(el("b", {}, value)); stats.append(s); };
  stat("log P", r.logprob === null ? "-inf" : r.logprob.toFixed(3));
  stat("tokens", String(r.num_tokens));
  stat("tokens/s", r.tokens_per_second === null ? "–" : r.tokens_per_second.toFixed(1));
  stat("time", r.seconds.toFixed(2) + " s");
  if (r.is_truncated) stat("truncated at", "max_len");
  box.append(stats);
}

function showError(e) {
  const box = $("error");
  box.hidden = false;
  box.replaceChildren(el("b", {}, (e.type || "error") + ": "), document.createTextNode(e.message));
  if (e.line) {
    const source = $("query").value.split("\n")[e.line - 1] ?? "";
    const caret = " ".repeat(Math.max(0, (e.column || 1) - 1)) + "^";
    box.append(el("pre", {}, `line ${e.line}: ${source}\n${" ".repeat(String(e.line).length + 7)}${caret}`));
    const start = $("query").value.split("\n").slice(0, e.line - 1).join("\n").length + (e.line > 1 ? 1 : 0);
    $("query").setSelectionRange(start, start + source.length);
  }
}

async function showModel() {
  const response = await fetch("/health").catch(() => null);
  if (response && response.ok) $("model").textContent = (await response.json()).model;
}

restoreInputs();
$("run").addEventListener("click", run);
$("stop").addEventListener("click", stop);
$("query").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !controller) run(); });
showModel();
