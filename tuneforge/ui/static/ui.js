// tuneforge dashboard: live run updates, the New run form's checks and start, stop buttons.
// Plain JS, no build step, nothing fetched from outside this server.
"use strict";

function formData(form) {
  const out = {};
  for (const el of form.querySelectorAll("input[name], textarea[name]")) {
    out[el.name] = el.type === "checkbox" ? el.checked : el.value;
  }
  return out;
}

async function postJSON(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                              body: JSON.stringify(body), credentials: "same-origin"});
  let data = {};
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  return {status: r.status, data};
}

function showProblems(form, problems) {
  for (const el of form.querySelectorAll(".problem")) { el.hidden = true; el.textContent = ""; }
  const general = document.getElementById("problems-general");
  general.hidden = true; general.textContent = "";
  for (const p of problems || []) {
    const el = (p.field && document.getElementById("p-" + p.field)) || general;
    el.hidden = false;
    el.textContent = (el.textContent ? el.textContent + "\n" : "") + p.message;
    el.closest(".field")?.classList.add("bad");
  }
  for (const f of form.querySelectorAll(".field")) {
    if (f.querySelector(".problem").hidden) f.classList.remove("bad");
  }
}

function showPlan(plan, error) {
  const el = document.getElementById("plan");
  if (error) { el.textContent = "no plan: " + error; return; }
  if (!plan) { el.textContent = "-"; return; }
  const mem = plan.memory.map(m => `${m.name}: ${m.free_gb} GB free of ${m.total_gb} GB`).join("; ");
  const rows = plan.rows.map(r => `<tr><td>${r.method}</td><td>${r.trainable.toLocaleString()}</td>` +
    `<td>${r.peak_gb}</td><td>${r.step_s == null ? "-" : r.step_s.toFixed(3)}</td>` +
    `<td class="${r.fits ? "up" : "down"}">${r.fits ? "yes" : "no"}</td></tr>`).join("");
  const total = plan.total_s == null ? "" : `<p>${plan.steps} steps: about ${plan.total_s < 10 ? plan.total_s.toFixed(2) : Math.round(plan.total_s)} s of compute (rough; loading and evaluation come on top)</p>`;
  const esc = (x) => String(x).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
  const auto = !(plan.auto || []).length ? "" : `<p>auto: decided from the data</p><table class="grid" id="plan-auto">` +
    `<thead><tr><th>setting</th><th>value</th><th>why</th></tr></thead><tbody>` +
    plan.auto.map(d => `<tr><td>${esc(d.setting)}</td><td>${esc(d.value)}</td><td>${esc(d.why)}</td></tr>`).join("") +
    `</tbody></table>`;
  el.innerHTML = auto + `<p>${plan.device} (${plan.dtype}), batch ${plan.batch} x ${plan.seq} tokens; ${mem}</p>` +
    `<table class="grid" id="plan-table"><thead><tr><th>method</th><th>trainable</th><th>peak GB</th>` +
    `<th>step s</th><th>fits</th></tr></thead><tbody>${rows}</tbody></table>${total}`;
}

function setupNewRun(form) {
  let timer = null, seq = 0;
  const check = async () => {
    const mine = ++seq;
    const {data} = await postJSON("/ui/api/validate", formData(form));
    if (mine !== seq) return;  // a newer check is on its way
    showProblems(form, data.problems);
    const verdict = document.getElementById("verdict");
    verdict.textContent = data.ok ? "valid config" : `${(data.problems || []).length} problem(s)`;
    verdict.className = data.ok ? "ok" : "error";
    document.getElementById("yaml").textContent = data.yaml || "";
    document.getElementById("cli").textContent = (data.cli || []).join("\n");
    showPlan(data.plan, data.plan_error);
  };
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 400); });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const result = document.getElementById("start-result");
    result.textContent = "queueing...";
    const {status, data} = await postJSON("/ui/api/runs", formData(form));
    if (data.ok) { window.location = data.url; return; }
    showProblems(form, data.problems || [{field: "", message: data.error?.message || `error ${status}`}]);
    result.textContent = "not started";
  });
  check();
}

function setupLive(section) {
  const tick = async () => {
    if (section.querySelector(".live")?.dataset.active !== "yes") return;
    const r = await fetch(section.dataset.url, {credentials: "same-origin"});
    if (r.ok) {
      section.innerHTML = await r.text();
      const status = section.querySelector(".live").dataset.status;
      const badge = document.getElementById("status");
      if (badge) { badge.textContent = status; badge.className = "status " + status; }
      if (section.querySelector(".live").dataset.active !== "yes") {
        document.getElementById("stop")?.remove();
        return;
      }
    }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}

function setupAction(button) {  // stop / resume: the page reloads to follow the new state
  button.addEventListener("click", async () => {
    button.disabled = true;
    const {status, data} = await postJSON(button.dataset.url, {});
    if (status === 200) { window.location.reload(); return; }
    button.textContent = data.error?.message || "failed";
  });
}

function setupReview(section) {
  // One decision per item; the page then moves to the next item (the queue is worked in order).
  const result = document.getElementById("decide-result");
  const send = async (decision) => {
    if (!section.querySelector("button.decide")) return;  // already decided
    const body = {decision};
    if (decision === "correct") body.corrected = document.getElementById("corrected").value;
    const {status, data} = await postJSON(section.dataset.url, body);
    if (status === 200) { window.location = section.dataset.next || section.dataset.here; return; }
    result.textContent = data.error?.message || `error ${status}`;
  };
  for (const b of section.querySelectorAll("button.decide")) b.addEventListener("click", () => send(b.dataset.decision));
  document.addEventListener("keydown", (ev) => {
    // Keys typed into the corrected answer are text, not shortcuts.
    if (ev.target.closest("input, textarea") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const go = {j: section.dataset.next, k: section.dataset.prev}[ev.key];
    if (go) { window.location = go; return; }
    const decision = {a: "accept", c: "correct", r: "reject"}[ev.key];
    if (!decision) return;
    ev.preventDefault();
    if (decision === "correct") { document.getElementById("corrected")?.focus(); return; }  // edit, then click
    send(decision);
  });
}

function setupFill(form) {  // admin: queue logged requests by the rules, then show the new counts
  const result = document.getElementById("fill-result");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {low_score: Number(form.low_score.value), sample_rate: Number(form.sample_rate.value),
                  seed: Number(form.seed.value)};
    const {status, data} = await postJSON("/ui/review/fill", body);
    if (status !== 200) { result.textContent = data.error?.message || `error ${status}`; return; }
    const added = Object.entries(data.added).map(([reason, n]) => `${n} ${reason}`).join(", ");
    result.textContent = added ? `queued ${added}` : "nothing new to queue";
    if (added) setTimeout(() => window.location.reload(), 1500);  // the list and reason counts include them
  });
}

function setupAliases() {  // promote (with force) and rollback; the gate's refusal is shown as is
  const result = document.getElementById("alias-result");
  const post = async (url, body) => {
    const {status, data} = await postJSON(url, body);
    if (status === 200) { window.location.reload(); return; }
    result.textContent = data.error?.message || `error ${status}`;
  };
  for (const form of document.querySelectorAll("form.promote")) {
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      post(form.dataset.url, {version: form.version.value, alias: form.alias.value, force: form.force.checked});
    });
  }
  for (const b of document.querySelectorAll("button.rollback")) {
    b.addEventListener("click", () => post(b.dataset.url, {alias: b.dataset.alias}));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const review = document.getElementById("review-item");
  if (review) setupReview(review);
  const fill = document.getElementById("fill");
  if (fill) setupFill(fill);
  setupAliases();
  const form = document.getElementById("new-run");
  if (form) setupNewRun(form);
  const live = document.getElementById("live");
  if (live) setupLive(live);
  for (const button of document.querySelectorAll("button.action")) setupAction(button);
});

// models
function setupRoutes() {  // A/B split and ending a test (admin key); a refusal is shown as is
  const result = document.getElementById("alias-result");
  const post = async (url, body) => {
    const {status, data} = await postJSON(url, body);
    if (status === 200) { window.location.reload(); return; }
    result.textContent = data.error?.message || `error ${status}`;
  };
  for (const form of document.querySelectorAll("form.split")) {
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const weights = {};
      // sent as typed: the server says which weight is not a number > 0
      for (const input of form.querySelectorAll("input[name]")) weights[input.name] = Number(input.value.trim() || NaN);
      post(form.dataset.url, {weights});
    });
  }
  for (const b of document.querySelectorAll("button.end-test")) {
    b.addEventListener("click", () => post(b.dataset.url, b.dataset.clear ? {clear: true} : {keep: b.dataset.keep}));
  }
  const windowForm = document.getElementById("models-window");
  windowForm?.window.addEventListener("change", () => windowForm.submit());
}
if (document.getElementById("models-window")) document.addEventListener("DOMContentLoaded", setupRoutes);
// compare: "clone into the form" (/ui/new?from=RUN) fills the New run form from that run's config
async function cloneInto(form, runId) {
  const general = document.getElementById("problems-general");
  const r = await fetch(`/ui/api/runs/${encodeURIComponent(runId)}/form`, {credentials: "same-origin"});
  let data = {};
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) {
    general.hidden = false;
    general.textContent = `cannot clone ${runId}: ${data.error?.message || "error " + r.status}`;
    return;
  }
  for (const [name, value] of Object.entries(data.form)) {
    const el = form.elements.namedItem(name);
    if (el) el.value = value;
  }
  const note = document.createElement("p");
  note.id = "cloned-from";
  note.className = "muted";
  note.textContent = `cloned from ${data.run}: change what you want, then start`;
  form.prepend(note);
  form.dispatchEvent(new Event("input"));  // the usual check, on the cloned values
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("new-run");
  const from = new URLSearchParams(window.location.search).get("from");
  if (form && from) cloneInto(form, from);
});
