// The oversight board's page: one WebSocket to the relay (/board/ws, JSON), a view
// of one namespace at a time, and actions signed in the page with the person's key.
// Everything shown is set with textContent: nothing from the relay becomes markup.

import * as wire from "/board/wire.js";

const COLUMNS = ["open", "claimed", "awaiting_approval", "blocked", "done"];
const $ = (id) => document.getElementById(id);

let socket = null;
let hello = null;
let signer = null; // {key, publicKey, jwk} once signed in
let watched = null; // the namespace shown
let pages = {}; // status -> the order number a page starts after
let state = null;
let clockSkew = 0; // relay clock minus ours, from the last state
let nextRid = 1;
const pending = new Map(); // rid -> what it was, for the answer's message
const verified = new Map(); // "ns/seq" -> true|false, signatures checked once

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function short(hexKey) {
  return hexKey ? `${hexKey.slice(0, 8)}…` : "";
}

function say(text, ok = false) {
  const message = $("message");
  message.textContent = text;
  message.className = ok ? "ok" : "error";
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

// -- the connection ---------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/board/ws`);
  socket.onmessage = (message) => receive(JSON.parse(message.data));
  socket.onclose = () => {
    $("live").textContent = "disconnected: reconnecting";
    setTimeout(connect, 1000);
  };
}

async function receive(message) {
  switch (message.t) {
    case "hello":
      hello = message;
      $("relay").textContent = `${message.relay} · ${short(message.key)}`;
      $("live").textContent = "live";
      if (signer) await authenticate();
      send({ t: "namespaces" });
      break;
    case "authed":
      $("who").textContent = `signed in as ${short(message.key)}`;
      $("who").title = message.key;
      $("signout").hidden = false;
      send({ t: "namespaces" });
      break;
    case "namespaces":
      showNamespaces(message.items);
      break;
    case "state":
      state = message;
      clockSkew = message.now_ms - Date.now();
      render();
      break;
    case "ack":
      answered(message);
      break;
    case "error":
      if (message.rid !== undefined) pending.delete(message.rid);
      say(`refused: ${message.name} (${message.code}): ${message.reason}`);
      break;
  }
}

// -- signing in -------------------------------------------------------------------------

async function authenticate() {
  // The relay's key is signed too: a sign-in asked for by another relay's page is no use here.
  const proof = wire.concat(wire.BOARD_AUTH_DOMAIN, wire.fromHex(hello.key), wire.fromHex(hello.challenge));
  const sig = await wire.sign(signer.key, proof);
  send({ t: "auth", key: wire.hex(signer.publicKey), sig: wire.hex(sig) });
}

async function signIn(made) {
  try {
    signer = await made;
  } catch (error) {
    say(`that is not a usable key: ${error}`);
    return;
  }
  sessionStorage.setItem("formicary-key", JSON.stringify(signer.jwk));
  if (hello) await authenticate();
}

function signOut() {
  sessionStorage.removeItem("formicary-key");
  location.reload(); // a fresh, read-only connection
}

// -- namespaces and watching ------------------------------------------------------------

function showNamespaces(items) {
  const select = $("namespace");
  const keep = watched;
  select.replaceChildren(...items.map((item) => el("option", `${item.ns} (${item.mode})`)));
  items.forEach((item, i) => (select.options[i].value = item.ns));
  const wanted = new URLSearchParams(location.hash.slice(1)).get("ns");
  const choice = items.find((i) => i.ns === keep) || items.find((i) => i.ns === wanted) || items[0];
  if (choice) {
    select.value = choice.ns;
    watch(choice.ns);
  }
}

function watch(ns) {
  if (ns !== watched) pages = {};
  watched = ns;
  location.hash = `ns=${encodeURIComponent(ns)}`;
  send({ t: "watch", ns, after: pages });
}

// -- rendering --------------------------------------------------------------------------

// What a person is typing survives the next state: cards are rebuilt on each one.
function inputKey(input) {
  const card = input.closest("[data-wo]");
  const place = input.closest("section")?.id || "";
  return card ? `${place}/${card.dataset.wo}/${input.placeholder}` : null;
}

function keepInputs() {
  const kept = new Map();
  for (const input of document.querySelectorAll("main input")) {
    const key = inputKey(input);
    if (key && input.value) kept.set(key, input.value);
  }
  const focused = document.activeElement;
  const focus = focused && focused.tagName === "INPUT" ? inputKey(focused) : null;
  return { kept, focus };
}

function restoreInputs({ kept, focus }) {
  for (const input of document.querySelectorAll("main input")) {
    const key = inputKey(input);
    if (key && kept.has(key)) input.value = kept.get(key);
    if (key && key === focus) input.focus();
  }
}

function render() {
  const typing = keepInputs();
  renderCounters();
  renderApprovals();
  renderColumns();
  $("agents").replaceChildren(
    ...state.agents.map((a) => el("li", `${a.name} ${a.role ? `(${a.role}) ` : ""}${a.capabilities.join(", ")} · ${short(a.agent)}`)),
  );
  $("auctions").replaceChildren(...state.auctions.map(renderAuction));
  renderEvents();
  $("documents").replaceChildren(...state.documents.map((d) => el("li", d)));
  const fed = state.federation;
  const lines = fed
    ? [
        ...fed.peers.map((p) => `${p.name}: ${p.up ? "up" : "down"} · outbox ${p.outbox}`),
        ...Object.entries(fed.mirrors).map(([ns, m]) => `mirror ${ns}: lag ${m.lag}`),
      ]
    : [];
  $("federation").replaceChildren(
    ...(lines.length ? lines.map((line) => el("li", line)) : [el("li", "no peers", "muted")]),
  );
  restoreInputs(typing);
  tick();
}

function renderCounters() {
  const c = state.counters;
  const rows = [
    ["namespace head", state.head],
    ["connections", c.connections],
    ["published", c.published],
    ["rejected", c.rejected],
    ["parked", c.parked],
    ...COLUMNS.map((s) => [s.replace("_", " "), state.counts[s] || 0]),
  ];
  $("counters").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
}

function renderConflict(conflict) {
  // A conflict the ladder brought to a person: keep one decision, the rest are overruled.
  const card = el("div", null, "card approval conflict");
  card.dataset.conflict = conflict.conflict;
  card.append(el("div", `${conflict.conflict} conflict on ${conflict.entity}`, "title"));
  const note = el("input");
  note.placeholder = "note";
  note.className = "comment";
  card.append(note);
  for (const d of conflict.records) {
    const line = el("div", null, "meta");
    line.append(el("span", `${d.id} by ${short(d.author)}: ${d.title}: ${d.decision} `));
    const keep = el("button", "Keep");
    keep.className = "keep";
    keep.dataset.keep = d.id;
    keep.disabled = !signer;
    keep.onclick = () => act("conflict.resolve", { conflict: conflict.conflict, keep: d.id, note: note.value }, `keep ${d.id}`);
    line.append(keep);
    card.append(line);
  }
  return card;
}

function renderApprovals() {
  const box = $("approvals");
  const conflicts = state.conflicts || [];
  if (!state.approvals.length && !conflicts.length) {
    box.replaceChildren(el("p", "nothing waiting", "muted"));
    return;
  }
  box.replaceChildren(
    ...conflicts.map(renderConflict),
    ...state.approvals.map((order) => {
      const card = el("div", null, "card approval");
      card.dataset.wo = order.id;
      card.append(el("div", `${order.id} ${order.title}`, "title"));
      const gate = order.approval;
      card.append(el("div", `why: ${gate.reason || "-"} · approvers: ${gate.role ? `role ${gate.role}` : ""} ${gate.approvers.map(short).join(" ")}`, "meta"));
      const comment = el("input");
      comment.placeholder = "comment";
      comment.className = "comment";
      const approve = el("button", "Approve");
      approve.className = "approve";
      const reject = el("button", "Reject");
      reject.className = "reject";
      approve.disabled = reject.disabled = !signer;
      approve.onclick = () => act("wo.approve", { wo: order.id, comment: comment.value }, `approve ${order.id}`);
      reject.onclick = () => act("wo.reject", { wo: order.id, comment: comment.value }, `reject ${order.id}`);
      card.append(comment, approve, reject);
      return card;
    }),
  );
}

function renderColumns() {
  const columns = COLUMNS.map((status) => {
    const column = el("div", null, "column");
    column.dataset.status = status;
    const total = state.counts[status] || 0;
    column.append(el("h3", `${status.replace("_", " ")} (${total})`));
    for (const order of state.columns[status].orders) column.append(renderOrder(order));
    if (state.columns[status].more || pages[status]) {
      const nav = el("div", null, "muted");
      if (pages[status]) {
        const first = el("button", "first");
        first.onclick = () => { delete pages[status]; watch(watched); };
        nav.append(first);
      }
      if (state.columns[status].more) {
        const next = el("button", "next page");
        const orders = state.columns[status].orders;
        next.onclick = () => { pages[status] = Number(orders[orders.length - 1].id.slice(3)); watch(watched); };
        nav.append(next);
      }
      column.append(nav);
    }
    return column;
  });
  $("columns").replaceChildren(...columns);
}

function renderOrder(order) {
  const card = el("div", null, "card order");
  card.dataset.wo = order.id;
  card.dataset.status = order.status;
  card.append(el("div", `${order.id} ${order.title}`, "title"));
  if (order.holder) {
    const meta = el("div", `held by ${short(order.holder)} · token ${order.token} · `, "meta holder");
    const countdown = el("span", "", "countdown");
    countdown.dataset.expires = order.expires_ms;
    meta.append(countdown);
    card.append(meta);
  }
  if (order.approval) {
    card.append(el("div", order.approval.approved ? "approved" : "needs approval", "meta"));
  }
  if (order.status === "blocked") {
    const reopen = el("button", "Reopen");
    reopen.disabled = !signer;
    reopen.onclick = () => act("wo.update", { wo: order.id, status: "open", reason: "reopened from the board" }, `reopen ${order.id}`);
    card.append(reopen);
  }
  const note = el("input");
  note.placeholder = "note";
  const add = el("button", "Note");
  add.disabled = !signer;
  add.onclick = () => note.value && act("wo.note", { wo: order.id, text: note.value }, `note on ${order.id}`);
  card.append(note, add);
  return card;
}

function renderAuction(auction) {
  const item = el("li", `${auction.auction} for ${auction.wo} · ${auction.phase} · ${auction.bids.length} bids`);
  const bids = el("ul");
  for (const bid of auction.bids) {
    bids.append(el("li", `${short(bid.bidder)} stake ${bid.stake} price ${bid.price ?? "sealed"}`));
  }
  item.append(bids);
  return item;
}

function renderEvents() {
  const rows = state.events.map((event) => {
    const row = el("tr");
    const mark = el("td", "checking…");
    row.append(el("td", event.seq), el("td", event.kind), el("td", short(event.author)), mark, el("td", event.sealed ? "sealed" : ""));
    checkSignature(event, mark);
    return row;
  });
  $("events").tBodies[0].replaceChildren(...rows);
}

async function checkSignature(event, mark) {
  const key = `${state.ns}/${event.seq}`;
  if (!verified.has(key)) {
    if (!event.event) {
      // Compacted (its bytes are gone, its receipt stays), or too large to send here.
      verified.set(key, event.size > 0 ? "large" : null);
    } else {
      // Checked against the signed bytes themselves: what the row shows (namespace,
      // kind, author) must be what the author signed, not only what the relay says.
      const signed = await wire.checkEvent(wire.fromB64(event.event), wire.fromB64(event.sig));
      const ok = signed !== null && signed.ns === state.ns && signed.kind === event.kind
        && wire.hex(signed.author) === event.author;
      verified.set(key, ok);
      if (verified.size > 2000) verified.delete(verified.keys().next().value);
    }
  }
  const ok = verified.get(key);
  if (ok === "large") mark.textContent = "not checked: too large to show";
  else if (ok === null) mark.textContent = "compacted";
  else mark.textContent = ok ? "✓ verified" : "✗ bad signature";
  mark.className = ok === false ? "bad" : "ok";
}

function tick() {
  const now = Date.now() + clockSkew;
  for (const span of document.querySelectorAll(".countdown")) {
    const left = Math.round((Number(span.dataset.expires) - now) / 1000);
    span.textContent = left >= 0 ? `lease ${left}s left` : `lease ran out ${-left}s ago`;
    span.classList.toggle("late", left < 0);
  }
}

// -- acting -----------------------------------------------------------------------------

async function act(kind, body, what) {
  if (!signer) {
    say("sign in with a key to act");
    return;
  }
  const { raw, sig } = await wire.signedEvent(signer, watched, kind, body);
  const rid = nextRid++;
  pending.set(rid, what);
  send({ t: "publish", rid, event: wire.b64(raw), sig: wire.b64(sig) });
}

function answered(ack) {
  const what = pending.get(ack.rid) || "action";
  pending.delete(ack.rid);
  if (ack.problem) say(`${what}: refused: ${ack.problem}: ${ack.reason}`);
  else say(`${what}: done (seq ${ack.seq})`, true);
}

// -- start ------------------------------------------------------------------------------

$("namespace").onchange = (e) => watch(e.target.value);
$("keyfile").onchange = async (e) => {
  const file = e.target.files[0];
  if (file) await signIn(wire.keyFromPem(await file.text()));
};
$("use-passphrase").onclick = () => {
  const phrase = $("passphrase").value;
  if (phrase) signIn(wire.keyFromPassphrase(phrase));
  $("passphrase").value = "";
};
$("signout").onclick = signOut;
setInterval(tick, 1000);
const kept = sessionStorage.getItem("formicary-key");
if (kept) signer = await wire.keyFromJwk(JSON.parse(kept)).catch(() => null);
connect();
window.formicaryBoard = { wire }; // for tests and the curious
