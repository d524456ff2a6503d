// The sinkserve chat page: one conversation (a sinkserve session) streamed through /v1/responses.
// The key, the conversation id and the transcript live in localStorage, so a reload shows the same chat.
"use strict";

const KEY_STORE = "sinkserve.apiKey";
const CONV_STORE = "sinkserve.conversation";
const transcriptStore = (cid) => "sinkserve.transcript." + cid;

const $ = (id) => document.getElementById(id);
let controller = null; // aborts the reply in flight

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }
function conversationId() { return localStorage.getItem(CONV_STORE) || ""; }

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "Authorization": "Bearer " + apiKey(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: controller ? controller.signal : undefined,
  });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return response;
}

function loadTranscript(cid) {
  try { return JSON.parse(localStorage.getItem(transcriptStore(cid)) || "[]"); } catch (_) { return []; }
}

function saveTranscript(cid, entries) {
  localStorage.setItem(transcriptStore(cid), JSON.stringify(entries));
}

function addMessage(role, text, cut) {
  const div = document.createElement("div");
  div.className = "message " + role + (cut ? " cut" : "");
  div.textContent = text;
  $("transcript").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function render() {
  const keyed = Boolean(apiKey());
  $("key-form").hidden = keyed;
  $("send").disabled = !keyed || controller !== null;
  $("transcript").replaceChildren();
  const cid = conversationId();
  $("session-id").textContent = cid ? cid.replace(/^conv_/, "") : "none yet";
  if (cid) for (const entry of loadTranscript(cid)) addMessage(entry.role, entry.text, entry.cut).dataset.done = "1";
}

async function refreshStatus() {
  const cid = conversationId();
  if (!cid || !apiKey()) return;
  try {
    const conv = await (await api("GET", "/v1/conversations/" + encodeURIComponent(cid))).json();
    const info = conv.sinkserve || {};
    $("cache-fill").textContent = info.cache_entries + " / " + info.cache_capacity;
    $("turns").textContent = String(info.turns);
  } catch (err) {
    if (err.status === 404) { // deleted or expired: start afresh
      localStorage.removeItem(CONV_STORE);
      render();
    }
    showError(err.message);
  }
}

async function ensureConversation() {
  let cid = conversationId();
  if (!cid) {
    const conv = await (await api("POST", "/v1/conversations", { metadata: { client: "web" } })).json();
    cid = conv.id;
    localStorage.setItem(CONV_STORE, cid);
    saveTranscript(cid, []);
    $("session-id").textContent = cid.replace(/^conv_/, "");
  }
  return cid;
}

// Calls onEvent with each SSE event's JSON data, reading the body as it arrives.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

async function send(text) {
  showError("");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let cid = null;
  let entries = null;
  let reply = null;
  let replyText = "";
  let cut = true;
  try {
    cid = await ensureConversation();
    entries = loadTranscript(cid);
    entries.push({ role: "user", text });
    saveTranscript(cid, entries);
    addMessage("user", text);
    reply = addMessage("assistant", "");
    reply.dataset.deltas = "0";
    const maxTokens = parseInt($("max-tokens").value, 10);
    const body = { input: text, conversation: cid, stream: true };
    if (maxTokens > 0) body.max_output_tokens = maxTokens;
    const response = await api("POST", "/v1/responses", body);
    await readEvents(response, (event) => {
      if (event.type === "response.output_text.delta") {
        replyText += event.delta;
        reply.textContent = replyText;
        reply.dataset.deltas = String(Number(reply.dataset.deltas) + 1);
      } else if (event.type === "response.completed" || event.type === "response.incomplete") {
        replyText = event.response.output_text;
        reply.textContent = replyText;
        cut = false;
      } else if (event.type === "error") {
        showError(event.message);
      }
    });
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    if (reply !== null) {
      reply.classList.toggle("cut", cut);
      reply.dataset.done = "1";
      entries.push({ role: "assistant", text: replyText, cut });
      saveTranscript(cid, entries);
    }
    controller = null;
    $("send").disabled = !apiKey();
    $("stop").disabled = true;
    await refreshStatus();
  }
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem(KEY_STORE, $("api-key").value.trim());
  $("api-key").value = "";
  render();
  refreshStatus();
});

$("send-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("message").value;
  if (!text.trim() || controller !== null || !apiKey()) return;
  $("message").value = "";
  send(text);
});

$("message").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("send-form").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (controller) controller.abort(); });

$("new-chat").addEventListener("click", () => {
  localStorage.removeItem(CONV_STORE);
  $("cache-fill").textContent = "-";
  $("turns").textContent = "0";
  render();
});

$("forget-key").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORE);
  render();
});

render();
refreshStatus();
