// tuneforge playground: one message to every column's model at once, each answer streamed.
// The stream is read with fetch + ReadableStream (EventSource only does GET); the server's
// events are /v1/chat/completions' own: "data: {chunk}\n\n" ... "data: [DONE]\n\n".
"use strict";

(() => {
  const form = document.getElementById("playground");
  if (!form) return;
  const columns = document.getElementById("pg-columns");
  const status = document.getElementById("pg-status");
  const send = document.getElementById("pg-send"), stop = document.getElementById("pg-stop");
  const history = new WeakMap();  // column -> its conversation so far (user and assistant turns)
  let controller = null;  // aborts every column's stream (Stop)

  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    e.className = cls;
    if (text) e.textContent = text;
    return e;
  };

  function reset(col) {
    history.set(col, []);
    col.querySelector(".pg-transcript").replaceChildren();
  }

  function setup(col) {
    reset(col);
    col.querySelector(".pg-model").addEventListener("change", () => reset(col));  // one model per conversation
    col.querySelector(".pg-remove").addEventListener("click", () => {
      if (columns.children.length > 1) col.remove();
    });
  }

  function addColumn() {
    const col = document.getElementById("pg-column").content.firstElementChild.cloneNode(true);
    const used = new Set([...columns.querySelectorAll(".pg-model")].map(s => s.value));
    const select = col.querySelector(".pg-model");
    select.value = [...select.options].map(o => o.value).find(v => !used.has(v)) || select.options[0].value;
    columns.append(col);
    setup(col);
  }

  // temperature and max_tokens are required, seed is optional (blank: none); an unreadable
  // number is said, never replaced by a default.
  function params() {
    const out = {};
    for (const input of [form.temperature, form.max_tokens, form.seed]) {
      if (input.value === "" && !input.required && input.validity.valid) continue;
      if (input.value === "" || !input.checkValidity()) {
        throw new Error(`${input.name}: ${input.validationMessage || "a number is needed"}`);
      }
      out[input.name] = Number(input.value);
    }
    return out;
  }

  function errorText(status, data) {
    const e = data && data.error;
    return e ? `${status} ${e.type || "error"}: ${e.message}` : `error ${status}`;
  }

  // Each SSE event's data, as parsed JSON (null for [DONE]), from a fetch Response body.
  async function* events(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) yield line.slice(6) === "[DONE]" ? null : JSON.parse(line.slice(6));
        }
      }
    }
  }

  // One column's turn: its conversation plus this message, streamed into a new answer element.
  async function turn(col, messages, body, signal) {
    const transcript = col.querySelector(".pg-transcript");
    const model = col.querySelector(".pg-model").value;
    const user = messages[messages.length - 1];
    const past = history.get(col);  // a model change during the stream starts a new conversation
    transcript.append(el("div", "pg-turn pg-user", user.content));
    const answer = el("div", "pg-turn pg-answer");
    const stats = el("p", "pg-stats muted", "waiting...");
    answer.dataset.chunks = "0";
    transcript.append(answer, stats);
    col.dataset.state = "streaming";
    const fail = (text) => {
      answer.append(el("span", "error", (answer.textContent ? "\n" : "") + text));
      col.dataset.state = "error";
    };
    const t0 = performance.now();
    let first = null, version = model, usage = null, finish = null, chunks = 0;
    try {
      const r = await fetch("/ui/api/chat", {
        method: "POST", headers: {"Content-Type": "application/json"}, credentials: "same-origin", signal,
        body: JSON.stringify({model, messages, stream: true, stream_options: {include_usage: true}, ...body}),
      });
      if (!r.ok || !(r.headers.get("content-type") || "").startsWith("text/event-stream")) {
        let data = null;
        try { data = await r.json(); } catch (e) { /* not JSON */ }
        fail(errorText(r.status, data));
        stats.textContent = "";
        return;
      }
      for await (const msg of events(r)) {
        if (msg === null) break;
        if (msg.error) { fail(`server error: ${msg.error.message}`); break; }  // in-band: headers were sent
        version = msg.model || version;
        if (msg.usage) usage = msg.usage;
        for (const c of msg.choices || []) {
          const text = c.delta && c.delta.content;
          if (text) {
            if (first === null) first = performance.now();
            answer.append(text);
            answer.dataset.chunks = String(++chunks);
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    } catch (e) {
      fail(e.name === "AbortError" ? "(stopped)" : `${e.name}: ${e.message}`);
    }
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : null;
    const parts = [`${version}`];
    if (first !== null) parts.push(`first token ${Math.round(first - t0)} ms`);
    if (tokens !== null) {
      // decode speed: the tokens after the first over the time they took to arrive
      const rate = tokens > 1 && first !== null && end > first ? ((tokens - 1) * 1000 / (end - first)).toFixed(1) : "-";
      parts.push(`${tokens} tokens`, `${rate} tokens/s`);
    }
    if (finish) parts.push(`finish: ${finish}`);
    stats.textContent = parts.join(" · ");
    if (col.dataset.state === "streaming") {
      col.dataset.state = "done";
      if (history.get(col) === past) past.push(user, {role: "assistant", content: answer.textContent});
    }
  }

  async function sendAll() {
    if (controller) return;  // still streaming: Stop first
    const text = form.user.value.trim();
    status.textContent = "";
    if (!text) { status.textContent = "type a message first"; return; }
    let body;
    try { body = params(); } catch (e) { status.textContent = e.message; return; }
    const system = form.system.value.trim();
    controller = new AbortController();
    send.disabled = true; stop.disabled = false;
    form.user.value = "";
    const user = {role: "user", content: text};
    await Promise.all([...columns.querySelectorAll(".pg-col")].map(col => turn(
      col, [...(system ? [{role: "system", content: system}] : []), ...history.get(col), user],
      body, controller.signal)));
    controller = null;
    send.disabled = false; stop.disabled = true;
  }

  for (const col of columns.querySelectorAll(".pg-col")) setup(col);
  form.addEventListener("submit", (ev) => { ev.preventDefault(); sendAll(); });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); sendAll(); }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  document.getElementById("pg-new").addEventListener("click", () => {
    if (!controller) for (const col of columns.querySelectorAll(".pg-col")) reset(col);
  });
  document.getElementById("pg-add").addEventListener("click", addColumn);
})();
