// Weir review console: plain JavaScript, no build step. Every action is one call to the console's
// /api, which forwards it to the review service's gRPC API with the reviewer's key.

const $ = (id) => document.getElementById(id);
const OPEN = new Set(["pending", "claimed"]);

const state = {
  key: sessionStorage.getItem("weir.key") || "",
  reviewer: sessionStorage.getItem("weir.reviewer") || "",
  queue: sessionStorage.getItem("weir.queue") || "default",
  items: new Map(), // id -> item, open items of the queue
  selected: null, // id of the selected item
  detail: null, // the item shown in the detail pane (fresh from the server)
  mode: "browse", // browse | reject | edit
  busy: false,
  watch: null, // AbortController of the event stream
  mine: 0, // decisions made in this tab
  mineApproved: 0,
};

// --- API ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "";
    this.reason = body.reason || "";
  }
}

async function api(path, body) {
  const init = { headers: { Authorization: `Bearer ${state.key}` } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const json = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

const q = () => encodeURIComponent(state.queue);

// --- status line ------------------------------------------------------------------------------

function say(text, bad = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("bad", bad);
}

// --- sign in ----------------------------------------------------------------------------------

async function signIn(event) {
  event?.preventDefault();
  if (event) {
    state.key = $("key").value.trim();
    state.reviewer = $("reviewer").value.trim();
  }
  if (!state.key || !state.reviewer) return;
  $("signin-error").textContent = "";
  try {
    const { queues } = await api("/api/queues");
    sessionStorage.setItem("weir.key", state.key);
    sessionStorage.setItem("weir.reviewer", state.reviewer);
    const select = $("queue");
    select.replaceChildren(...queues.map((name) => new Option(name, name)));
    if (!queues.includes(state.queue)) state.queue = queues[0];
    select.value = state.queue;
    $("signin").hidden = true;
    $("workspace").hidden = false;
    $("who").hidden = false;
    $("me").textContent = `Signed in as ${state.reviewer}`;
    await openQueue();
    $("items").focus();
  } catch (error) {
    const why = error.status === 401 ? "That key is not valid."
      : error.status === 403 ? "That key does not have the reviewer role."
      : `Cannot sign in: ${error.message}`;
    $("signin-error").textContent = why;
    if (!event) $("signin").hidden = false;
  }
}

function signOut() {
  sessionStorage.removeItem("weir.key");
  state.key = "";
  state.watch?.abort();
  location.reload();
}

// --- the queue --------------------------------------------------------------------------------

// Most urgent first: higher priority, then the earlier SLA deadline, then the older item.
function urgency(a, b) {
  return (b.priority - a.priority)
    || (Date.parse(a.sla_deadline_time || 0) - Date.parse(b.sla_deadline_time || 0))
    || (Date.parse(a.create_time || 0) - Date.parse(b.create_time || 0));
}

const sorted = () => [...state.items.values()].sort(urgency);

async function openQueue() {
  sessionStorage.setItem("weir.queue", state.queue);
  state.items.clear();
  state.selected = null;
  showDetail(null);
  await reload();
  watch();
}

async function reload() {
  const [pending, claimed] = await Promise.all([
    api(`/api/queues/${q()}/items?state=pending`),
    api(`/api/queues/${q()}/items?state=claimed`),
  ]);
  state.items.clear();
  for (const item of [...pending.items, ...claimed.items]) state.items.set(item.id, item);
  renderList();
  refreshStats();
}

// Live updates: the server-sent events of /events, read with fetch so the key goes in a header.
async function watch() {
  state.watch?.abort();
  const controller = new AbortController();
  state.watch = controller;
  const live = $("live");
  while (!controller.signal.aborted) {
    try {
      const response = await fetch(`/api/queues/${q()}/events`, {
        headers: { Authorization: `Bearer ${state.key}` },
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      live.classList.remove("off");
      live.textContent = "live";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    // The stream ended (the server caps how long a call lives) or failed: catch up, reconnect.
    live.classList.add("off");
    live.textContent = "reconnecting";
    await new Promise((resolve) => setTimeout(resolve, 1000));
    if (!controller.signal.aborted) await reload().catch(() => {});
  }
}

function onEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (event !== "item" || data.length === 0) return;
  const item = JSON.parse(data.join("\n"));
  if (item.queue !== state.queue) return;
  const known = state.items.has(item.id);
  if (OPEN.has(item.state)) {
    state.items.set(item.id, item);
    if (!known) say(`New item from ${item.model || "a model"}: ${item.reasons.join(", ")}`);
  } else {
    state.items.delete(item.id);
  }
  if (state.detail && state.detail.id === item.id) showDetail(item);
  renderList(known ? null : item.id);
  refreshStats();
}

let statsTimer = null;
function refreshStats() {
  // At most one stats call per second, however fast items change.
  if (statsTimer) return;
  statsTimer = setTimeout(async () => {
    statsTimer = null;
    try {
      const stats = await api(`/api/queues/${q()}/stats`);
      $("stat-pending").textContent = stats.pending;
      $("stat-claimed").textContent = stats.claimed;
      $("stat-breached").textContent = stats.sla_breached;
      $("stat-oldest").textContent = stats.pending ? duration(stats.oldest_pending_age_ms) : "–";
      $("stat-hour").textContent = stats.decided_last_hour;
      const me = stats.reviewers.find((r) => r.reviewer === state.reviewer);
      const decided = me ? me.decided : state.mine;
      const approved = me ? me.approved : state.mineApproved;
      $("stat-mine").textContent = decided;
      $("stat-rate").textContent = decided ? `${Math.round((100 * approved) / decided)} %` : "–";
    } catch { /* the next change tries again */ }
  }, 200);
}

function duration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function slaText(item) {
  if (!item.sla_deadline_time) return { text: "no SLA", cls: "" };
  const left = Date.parse(item.sla_deadline_time) - Date.now();
  if (left < 0) return { text: `SLA passed ${duration(-left)} ago`, cls: "breached" };
  return { text: `${duration(left)} left`, cls: left < 60000 ? "soon" : "" };
}

function renderList(arrived = null) {
  const list = $("items");
  const items = sorted();
  if (state.selected && !state.items.has(state.selected)) state.selected = null;
  if (!state.selected && items.length) select(items[0].id, false);
  list.replaceChildren(...items.map((item) => {
    const li = document.createElement("li");
    li.id = `item-${item.id}`;
    li.setAttribute("role", "option");
    li.dataset.id = item.id;
    li.setAttribute("aria-selected", String(item.id === state.selected));
    if (item.id === arrived) li.classList.add("new");
    const sla = slaText(item);
    const claimed = item.state === "claimed" && item.lease
      ? `<span class="claimed">claimed by ${escape(item.lease.reviewer)}</span>` : "";
    li.innerHTML = `<div class="row1"><strong>P${item.priority} · ${escape(item.model || "?")}</strong>`
      + `<span class="sla ${sla.cls}" data-sla="${escape(item.sla_deadline_time || "")}">${sla.text}</span></div>`
      + `<div class="reasons">${escape(item.reasons.join(", ") || "flagged")}</div>${claimed}`;
    li.addEventListener("click", () => select(item.id));
    return li;
  }));
  list.setAttribute("aria-activedescendant", state.selected ? `item-${state.selected}` : "");
  $("empty").hidden = items.length > 0;
  if (!items.length) showDetail(null);
}

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// The SLA countdowns tick every second without a re-render.
setInterval(() => {
  for (const span of document.querySelectorAll("[data-sla]")) {
    const item = state.items.get(span.closest("li")?.dataset.id) || state.detail;
    if (!item) continue;
    const sla = slaText(item);
    span.textContent = sla.text;
    span.className = `sla ${sla.cls}`;
  }
}, 1000);

// --- the item ---------------------------------------------------------------------------------

async function select(id, fetchDetail = true) {
  state.selected = id;
  for (const li of $("items").children) li.setAttribute("aria-selected", String(li.dataset.id === id));
  $("items").setAttribute("aria-activedescendant", `item-${id}`);
  document.getElementById(`item-${id}`)?.scrollIntoView({ block: "nearest" });
  const cached = state.items.get(id);
  if (cached) showDetail(cached);
  if (fetchDetail) {
    try {
      const { item } = await api(`/api/items/${encodeURIComponent(id)}`);
      if (state.selected === id && item) showDetail(item);
    } catch { /* the list entry is enough */ }
  }
}

function mine(item) {
  return item && item.state === "claimed" && item.lease && item.lease.reviewer === state.reviewer
    && state.leases.has(item.id);
}
state.leases = new Map(); // id -> lease_id of the leases this tab holds

function showDetail(item) {
  // A fresh copy of the same item (its own claim arriving live) keeps an edit or reason open.
  const same = item && state.detail && state.detail.id === item.id;
  state.detail = item;
  if (!same) setMode("browse");
  $("no-item").hidden = !!item;
  $("item").hidden = !item;
  if (!item) return;
  $("item-model").textContent = item.model || "unknown model";
  $("item-priority").textContent = item.priority;
  const sla = slaText(item);
  const slaSpan = $("item-sla");
  slaSpan.textContent = sla.text;
  slaSpan.className = `sla ${sla.cls}`;
  slaSpan.dataset.sla = item.sla_deadline_time || "";
  $("item-state").textContent = item.state === "claimed" && item.lease
    ? (mine(item) ? "claimed by you" : `claimed by ${item.lease.reviewer}`)
    : item.state;
  $("item-reasons").textContent = item.reasons.join(", ") || "no reason given";
  $("item-conversation").replaceChildren(...item.conversation.map((m) => {
    const li = document.createElement("li");
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = `${m.role}:`;
    li.append(role, document.createTextNode(m.content));
    return li;
  }));
  $("item-output").textContent = item.output ? item.output.content : "";
  $("item-id").textContent = item.id;
  $("item-trace").textContent = item.trace_id || "–";
}

function setMode(mode) {
  state.mode = mode;
  $("edit-form").hidden = mode !== "edit";
  $("reject-form").hidden = mode !== "reject";
  if (mode === "edit") {
    $("edit-text").value = state.detail?.output?.content || "";
    $("edit-text").focus();
  } else if (mode === "reject") {
    $("reject-reason").value = "";
    $("reject-reason").focus();
  }
}

// A lease on the selected item: the one this tab holds, or a new one.
async function lease(item) {
  if (state.leases.has(item.id)) return state.leases.get(item.id);
  const { item: claimed } = await api(`/api/items/${encodeURIComponent(item.id)}/claim`, {
    queue: state.queue,
    reviewer: state.reviewer,
  });
  state.leases.set(claimed.id, claimed.lease.lease_id);
  state.items.set(claimed.id, claimed);
  if (state.selected === claimed.id) showDetail(claimed);
  return claimed.lease.lease_id;
}

async function claimSelected() {
  const item = state.detail;
  if (!item || state.busy) return;
  state.busy = true;
  try {
    await lease(item);
    say(`You hold item ${item.id} for review.`);
  } catch (error) {
    say(`Cannot claim: ${error.message}`, true);
  } finally {
    state.busy = false;
  }
}

async function decide(verdict, extra = {}) {
  const item = state.detail;
  if (!item || state.busy) return;
  state.busy = true;
  try {
    const leaseId = await lease(item);
    await api(`/api/items/${encodeURIComponent(item.id)}/decision`, { lease_id: leaseId, verdict, ...extra });
    state.leases.delete(item.id);
    state.mine += 1;
    if (verdict === "approve") state.mineApproved += 1;
    const next = nextAfter(item.id);
    state.items.delete(item.id);
    state.selected = null;
    renderList();
    if (next) select(next); else showDetail(null);
    say(`${{ approve: "Approved", reject: "Rejected", edit: "Edited" }[verdict]} item ${item.id}.`);
    refreshStats();
    $("items").focus();
  } catch (error) {
    say(`Not decided: ${error.message}`, true);
    if (error.status === 409 || error.status === 404) {
      state.leases.delete(item.id);
      await reload().catch(() => {});
    }
  } finally {
    state.busy = false;
  }
}

function nextAfter(id) {
  const items = sorted().filter((item) => item.state === "pending" || state.leases.has(item.id));
  const index = items.findIndex((item) => item.id === id);
  return (items[index + 1] || items[index - 1] || {}).id || null;
}

function move(step) {
  const items = sorted();
  if (!items.length) return;
  const index = items.findIndex((item) => item.id === state.selected);
  const next = items[Math.min(items.length - 1, Math.max(0, index + step))];
  if (next) select(next.id);
}

// Keep held leases alive while the tab is open (the service's default lease is minutes long).
setInterval(async () => {
  for (const [id, leaseId] of state.leases) {
    try {
      await api(`/api/items/${encodeURIComponent(id)}/renew`, { lease_id: leaseId });
    } catch {
      state.leases.delete(id);
    }
  }
}, 60000);

// --- keys -------------------------------------------------------------------------------------

function onKey(event) {
  if ($("workspace").hidden || event.ctrlKey && event.key !== "Enter" || event.metaKey || event.altKey) return;
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(event.target.tagName);
  if (event.key === "Escape") {
    setMode("browse");
    $("items").focus();
    return;
  }
  if (typing) return; // forms handle their own Enter
  const actions = {
    j: () => move(1), ArrowDown: () => move(1),
    k: () => move(-1), ArrowUp: () => move(-1),
    Enter: () => claimSelected(),
    a: () => decide("approve"),
    r: () => state.detail && setMode("reject"),
    e: () => state.detail && setMode("edit"),
    "?": () => { $("help").hidden = !$("help").hidden; },
  };
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = state.key;
  $("reviewer").value = state.reviewer;
  $("signin").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  $("queue").addEventListener("change", (event) => {
    state.queue = event.target.value;
    openQueue();
  });
  $("approve").addEventListener("click", () => decide("approve"));
  $("reject").addEventListener("click", () => setMode("reject"));
  $("edit").addEventListener("click", () => setMode("edit"));
  $("reject-form").addEventListener("submit", (event) => {
    event.preventDefault();
    decide("reject", { comment: $("reject-reason").value });
  });
  $("edit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    decide("edit", { edited_content: $("edit-text").value });
  });
  $("edit-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.ctrlKey) {
      event.preventDefault();
      decide("edit", { edited_content: $("edit-text").value });
    }
  });
  document.addEventListener("keydown", onKey);
  if (state.key && state.reviewer) {
    $("signin").hidden = true;
    signIn();
  }
});
