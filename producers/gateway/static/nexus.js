// Nexus page: submit over the websocket bridge, watch tokens arrive, and watch every result.
// No framework, no build step. The protocol is documented in the README ("Websocket bridge").
"use strict";

const RECENT_ROWS = 50;
const RESUME_MARGIN_MS = 5000; // on reconnect, replay a little before the drop; duplicates are dropped by id

const $ = (id) => document.getElementById(id);

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const page = {
  sessionId: sessionStorage.getItem("nexus-session") || randomId(),
  // The API key's token when the gateway wants one (docs/security.md): from #token=... or typed in,
  // kept in this tab only; sent as a bearer header to the gateway and as ?token= to the bridge.
  token: takeTokenFromHash() || sessionStorage.getItem("nexus-token"),
  ws: null,
  url: null,
  droppedAt: null, // Date.now() when the socket closed; resume from a bit before it
  current: null, // {id, t0, nextSeq, text, toolCalls, firstTokenAt}
  seenResults: new Set(),
  lastRun: null, // for tests and benchmarks: {id, ttft_ms, result_ms, output}
};
window.nexusPage = page;
sessionStorage.setItem("nexus-session", page.sessionId);

function takeTokenFromHash() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!token) return null;
  sessionStorage.setItem("nexus-token", token);
  history.replaceState(null, "", location.pathname + location.search); // keep it out of the address bar
  return token;
}

function authHeaders() {
  return page.token ? { Authorization: `Bearer ${page.token}` } : {};
}

function askForKey(message) {
  const form = $("key");
  form.hidden = false;
  $("key-message").textContent = message;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("nexus-token", $("key-token").value.trim());
    location.reload();
  });
}

function withToken(url) {
  if (!page.token) return url;
  return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(page.token)}`;
}

function ms(value) {
  return value == null ? "–" : `${Math.round(value)} ms`;
}

function setConnection(state, text) {
  const el = $("connection");
  el.dataset.state = state;
  el.textContent = text;
  $("submit").disabled = state !== "open" || !$("model").value;
}

async function bridgeUrl(config) {
  const override = new URLSearchParams(location.search).get("bridge");
  if (override) return override;
  if (config.bridge_url) return config.bridge_url;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.hostname}:${config.bridge_port}${config.bridge_path}`;
}

async function loadModels() {
  const response = await fetch("/models", { headers: authHeaders() });
  if (response.status === 401) throw new KeyNeeded((await response.json()).error);
  const { models } = await response.json();
  const select = $("model");
  for (const model of models) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.appendChild(option);
  }
}

function send(frame) {
  page.ws.send(JSON.stringify(frame));
}

function connect() {
  setConnection("connecting", `connecting to ${page.url}…`);
  const ws = new WebSocket(withToken(page.url));
  page.ws = ws;
  ws.onopen = () => {
    setConnection("open", `live · ${page.url}`);
    // First visit: live from now on; after a drop: replay from just before it, so nothing is lost.
    const since = page.droppedAt == null ? undefined : page.droppedAt - RESUME_MARGIN_MS;
    send({ type: "subscribe", all: true, since });
    send({ type: "subscribe", session_id: page.sessionId, since });
  };
  ws.onmessage = (event) => onFrame(JSON.parse(event.data));
  ws.onclose = (event) => {
    if (page.ws !== ws) return;
    page.droppedAt = Date.now();
    setConnection("closed", `disconnected (${event.code}${event.reason ? ": " + event.reason : ""}); retrying…`);
    setTimeout(connect, 1000);
  };
}

function onFrame(frame) {
  switch (frame.type) {
    case "token": return onToken(frame);
    case "result": return onResult(frame);
    case "error": return onError(frame);
    case "accepted":
      if (page.current && frame.id === page.current.id) $("status").textContent = "accepted by Kafka";
      return;
    case "queued": // where the request waits in a worker's schedule
      if (page.current && frame.id === page.current.id && !page.current.done) {
        $("status").textContent = `queued: position ${frame.position}, starts in about ${Math.ceil(frame.eta_ms / 1000)} s`;
      }
      return;
    default: return; // subscribed, unsubscribed, replayed, cancelling
  }
}

// A tool call as one line: name({"arg": ...}).
function callText(call) {
  const args = typeof call.arguments === "string" ? call.arguments : JSON.stringify(call.arguments);
  return `${call.name}(${args})`;
}

// The answer's tool calls (name and arguments), under its text; hidden when there are none.
function showToolCalls(calls) {
  const list = $("tool-calls");
  list.replaceChildren(...calls.map((call) => {
    const item = document.createElement("li");
    const name = document.createElement("b");
    name.textContent = "tool call ";
    item.append(name, callText(call));
    return item;
  }));
  list.hidden = calls.length === 0;
}

function answerText(result) {
  if (result.status !== "ok") return result.error;
  const calls = (result.tool_calls || []).map((call) => `[tool call] ${callText(call)}`);
  return [result.output, ...calls].filter((part) => part).join(" ");
}

function onToken(frame) {
  const run = page.current;
  if (!run || frame.id !== run.id || frame.seq !== run.nextSeq || run.done) return; // replayed or stray
  if (run.firstTokenAt == null) {
    run.firstTokenAt = performance.now();
    $("ttft").textContent = ms(run.firstTokenAt - run.t0);
  }
  run.nextSeq += 1;
  run.chunks += 1;
  run.text += frame.text;
  if (frame.tool_calls && frame.tool_calls.length) {
    run.toolCalls.push(...frame.tool_calls); // streamed whole, one chunk may carry several
    showToolCalls(run.toolCalls);
  }
  const answer = $("answer");
  answer.textContent = run.text;
  answer.dataset.state = "streaming";
  $("status").textContent = "streaming";
}

function onResult(result) {
  const run = page.current;
  if (run && result.id === run.id && !run.done) {
    run.done = true;
    const now = performance.now();
    const answer = $("answer");
    answer.textContent = result.status === "ok" ? result.output : result.error;
    answer.dataset.state = result.status === "ok" ? "done" : "error";
    showToolCalls(result.status === "ok" ? result.tool_calls || [] : []);
    $("status").textContent = result.status + (result.cached ? " (cached)" : "");
    $("result-time").textContent = ms(now - run.t0);
    if (run.firstTokenAt == null) $("ttft").textContent = "– (not streamed)";
    $("latency").textContent = ms(result.latency_ms);
    $("endpoint").textContent = result.endpoint || "–";
    $("tokens").textContent = `${result.prompt_tokens} in · ${result.completion_tokens} out`;
    page.lastRun = {
      id: run.id,
      ttft_ms: run.firstTokenAt == null ? null : run.firstTokenAt - run.t0,
      result_ms: now - run.t0,
      output: result.output,
      tool_calls: result.tool_calls || [],
      streamed_text: run.text,
      streamed_tool_calls: run.toolCalls,
      chunks: run.chunks,
      status: result.status,
    };
    $("submit").disabled = page.ws.readyState !== WebSocket.OPEN;
  }
  addRecent(result);
}

function onError(frame) {
  const run = page.current;
  if (run && (frame.id === run.id || frame.id == null) && !run.done) {
    run.done = true;
    const answer = $("answer");
    answer.textContent = frame.reason;
    answer.dataset.state = "error";
    $("status").textContent = `error${frame.status ? " " + frame.status : ""}`;
    $("submit").disabled = false;
  }
}

function addRecent(result) {
  if (page.seenResults.has(result.id)) return;
  page.seenResults.add(result.id);
  const row = document.createElement("tr");
  if (result.context.session_id === page.sessionId) row.className = "mine";
  const cells = [
    new Date(result.completed_at).toLocaleTimeString(),
    result.context.session_id.slice(0, 12),
    result.model_id,
    result.status,
    ms(result.latency_ms),
    result.endpoint || "–",
    answerText(result),
  ];
  cells.forEach((text, i) => {
    const cell = document.createElement("td");
    cell.textContent = text;
    if (i === 3) cell.className = `status-${result.status}`;
    if (i === 6) { cell.className = "output"; cell.title = text; }
    row.appendChild(cell);
  });
  row.dataset.id = result.id;
  const body = $("recent");
  body.insertBefore(row, body.firstChild);
  while (body.rows.length > RECENT_ROWS) body.deleteRow(-1);
}

function submit(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim() || !page.ws || page.ws.readyState !== WebSocket.OPEN) return;
  const id = randomId();
  page.current = {
    id, t0: performance.now(), nextSeq: 0, chunks: 0, text: "", toolCalls: [], firstTokenAt: null, done: false,
  };
  $("request-id").textContent = id.slice(0, 12);
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.state = "waiting";
  showToolCalls([]);
  for (const el of ["ttft", "result-time", "latency", "endpoint", "tokens"]) $(el).textContent = "–";
  $("status").textContent = "submitting";
  $("submit").disabled = true;
  send({
    type: "submit",
    id,
    model_id: $("model").value,
    input: prompt,
    stream: $("stream").checked,
    context: { session_id: page.sessionId, metadata: { source: "page" } },
  });
}

class KeyNeeded extends Error {}

async function main() {
  $("session").textContent = page.sessionId;
  $("ask").addEventListener("submit", submit);
  try {
    const config = await (await fetch("/config.json")).json();
    if (config.api_keys && !page.token) throw new KeyNeeded("this gateway needs an API key");
    await loadModels();
    page.url = await bridgeUrl(config);
  } catch (error) {
    if (error instanceof KeyNeeded) {
      setConnection("closed", "API key needed");
      askForKey(error.message);
    } else {
      setConnection("closed", `cannot load the gateway's config: ${error}`);
    }
    return;
  }
  connect();
}

main();
