// The chat UI: plain DOM, no build step. Model text only ever reaches the page through renderMarkdown
// (textContent), never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
// pending: the compare panel whose vote is not cast yet (render() keeps it; no new turn starts until then)
const state = { convId: null, messages: [], versions: [], active: null, busy: false, controllers: [], pending: null };
window.__chunks = 0;  // SSE deltas received (the browser test checks that replies stream)

function raterId() {
  let id = localStorage.getItem("chatforge.rater");
  if (!id) {
    id = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now();
    localStorage.setItem("chatforge.rater", id);
  }
  return id;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("chatforge.key") || "";
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, body, method) {
  const res = await fetch(path, {
    method: method || (body === undefined ? "GET" : "POST"),
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || res.statusText);
  return data;
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return e;
}

function setContent(node, text) {
  node.replaceChildren(window.renderMarkdown(text));
}

// ---------------------------------------------------------------- streaming

function promptMessages(upTo) {
  const sys = $("system").value.trim();
  const msgs = state.messages.slice(0, upTo === undefined ? state.messages.length : upTo)
    .map((m) => ({ role: m.role, content: m.content }));
  return sys ? [{ role: "system", content: sys }, ...msgs] : msgs;
}

function sampling() {
  return {
    temperature: Number($("temperature").value || 0.7),
    max_tokens: Number($("max-tokens").value || 128),
  };
}

async function streamChat(model, messages, extra, onDelta) {
  const ctrl = new AbortController();
  state.controllers.push(ctrl);
  let res;
  try {
    res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model, messages, stream: true, ...sampling(), ...extra }),
      signal: ctrl.signal,
    });
  } catch (e) {
    // Stop pressed before the server answered: stopped with no text, not an error.
    if (e.name === "AbortError") return { text: "", finish: "stopped", model };
    throw e;
  }
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || res.statusText);
  }
  // The safety policy says when it ignored part of the system message (e.g. "safety: off").
  const notes = res.headers.get("x-chatforge-safety-notes");
  if (notes) showError("Safety settings: " + JSON.parse(notes).join("; "));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", text = "", finish = null, served = model;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          served = chunk.model || served;
          for (const ch of chunk.choices || []) {
            if (ch.delta && ch.delta.content) {
              text += ch.delta.content;
              window.__chunks++;
              onDelta(text);
            }
            if (ch.finish_reason) finish = ch.finish_reason;
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") throw e;
    finish = "stopped";
  }
  return { text, finish, model: served };
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  if (!busy) state.controllers = [];
}

// ---------------------------------------------------------------- rendering

function messageNode(m, idx) {
  const body = el("div", { class: "content", "data-testid": "content" });
  setContent(body, m.content);
  const node = el("div", { class: "msg " + m.role, "data-index": String(idx), "data-testid": "msg-" + m.role }, body);
  const tools = el("div", { class: "tools" });
  if (m.role === "user") {
    tools.appendChild(el("button", { type: "button", title: "Edit and resend", onclick: () => editMessage(idx) }, "✎ Edit"));
  } else {
    if (m.model) tools.appendChild(el("span", { class: "model-tag", text: m.model }));
    const up = el("button", { type: "button", class: m.rating === 1 ? "on" : "", "data-testid": "thumb-up", title: "Good answer", onclick: () => rate(idx, 1) }, "👍");
    const down = el("button", { type: "button", class: m.rating === -1 ? "on" : "", "data-testid": "thumb-down", title: "Bad answer", onclick: () => rate(idx, -1) }, "👎");
    tools.append(up, down);
    if (idx === state.messages.length - 1) {
      tools.appendChild(el("button", { type: "button", "data-testid": "regenerate", onclick: regenerate }, "↻ Regenerate"));
    }
    if (m.rating) {
      const reason = el("input", { type: "text", class: "reason", placeholder: "Why? (optional)", "data-testid": "reason" });
      reason.value = m.rating_reason || "";
      reason.addEventListener("change", () => rate(idx, m.rating, reason.value));
      tools.appendChild(reason);
    }
  }
  node.appendChild(tools);
  return node;
}

function render() {
  $("messages").replaceChildren(...state.messages.map(messageNode), ...(state.pending ? [state.pending] : []));
  $("messages").scrollTop = $("messages").scrollHeight;
}

// ---------------------------------------------------------------- conversation actions

async function save() {
  const first = state.messages.find((m) => m.role === "user");
  const res = await api("/ui/conversations", {
    id: state.convId,
    title: first ? Array.from(first.content).slice(0, 60).join("") : "New chat",  // whole characters: never half an emoji
    system: $("system").value,
    messages: state.messages.map((m) => ({ role: m.role, content: m.content, model: m.model || "" })),
    rater: raterId(),
  });
  state.convId = res.id;
  // The address names the conversation, so a reload (or a bookmark) opens it again.
  if (location.hash !== "#" + res.id) history.replaceState(null, "", "#" + res.id);
  loadHistory();
}

async function assistantTurn() {
  const model = $("model").value;
  const msg = { role: "assistant", content: "", model };
  const prompt = promptMessages();
  state.messages.push(msg);
  render();
  const node = $("messages").lastElementChild;
  node.classList.add("streaming");
  const content = node.querySelector(".content");
  setBusy(true);
  let ok = true;
  try {
    const out = await streamChat(model, prompt, {}, (text) => { msg.content = text; setContent(content, text); });
    msg.content = out.text;
    msg.model = out.model;
    if (model === DEFAULT && out.model !== state.active) fillPickers(out.model);  // promoted meanwhile
    if (!out.text.trim()) {
      // Nothing to keep (Stop before the first token, or an empty reply): an empty assistant turn
      // would be stored and carried into every later prompt. The caller takes the turn back.
      showError(out.finish === "stopped" ? STOPPED_EARLY : "The model gave an empty answer: nothing was kept.");
      state.messages.pop();
      ok = false;
    }
  } catch (e) {
    showError(e.message);
    state.messages.pop();
    ok = false;
  } finally {
    setBusy(false);
    render();
  }
  if (ok) await save();
  return ok;
}

const STOPPED_EARLY = "Stopped before the first word: nothing was kept.";
const VOTE_FIRST = "Pick the better answer (or Tie / Both bad) first: the conversation goes on from it.";

async function send(text) {
  showError("");
  const before = state.messages.length;
  state.messages.push({ role: "user", content: text });
  const ok = $("compare").checked ? await compareTurn() : await assistantTurn();
  if (!ok) {
    // No answer (e.g. the message is too long for the model): take the turn back, so the thread never
    // holds two user turns in a row, and give the text back to edit or resend.
    state.messages.length = before;
    render();
    if (!$("input").value) $("input").value = text;
  }
}

async function regenerate() {
  if (state.busy) return;
  const last = state.messages[state.messages.length - 1];
  const old = last && last.role === "assistant" ? state.messages.pop() : null;
  if (!(await assistantTurn()) && old) {
    state.messages.push(old);  // the new answer failed: keep the one there was
    render();
  }
}

function editMessage(idx) {
  if (state.busy) return;
  if (state.pending) return showError(VOTE_FIRST);
  const node = $("messages").querySelector(`[data-index="${idx}"]`);
  const box = el("textarea", { class: "edit", rows: "3", "data-testid": "edit-box" });
  box.value = state.messages[idx].content;
  const ok = el("button", { type: "button", "data-testid": "edit-send", onclick: async () => {
    state.messages = state.messages.slice(0, idx);
    await send(box.value);
  } }, "Send");
  const cancel = el("button", { type: "button", onclick: render }, "Cancel");
  node.replaceChildren(box, el("div", { class: "tools" }, ok, cancel));
  box.focus();
}

async function rate(idx, value, reason) {
  const m = state.messages[idx];
  if (!state.convId) await save();
  m.rating = reason === undefined && m.rating === value ? 0 : value;
  m.rating_reason = reason || (m.rating ? m.rating_reason || "" : "");
  await api("/ui/ratings", { conversation_id: state.convId, index: idx, rating: m.rating, reason: m.rating_reason });
  if (reason === undefined) render();
}

// ---------------------------------------------------------------- compare mode

async function compareTurn() {
  const prompt = promptMessages();
  const models = { a: $("model-a").value, b: $("model-b").value };
  const rnd = new Uint32Array(3);
  crypto.getRandomValues(rnd);
  const seeds = { a: rnd[0] % 2147483647, b: rnd[1] % 2147483647 };
  const aLeft = (rnd[2] & 1) === 0;  // randomised position: raters must not learn "left is the new model"
  const order = aLeft ? ["a", "b"] : ["b", "a"];
  const cols = {};
  const panel = el("div", { class: "compare", "data-testid": "compare-panel" });
  for (const side of order) {
    const content = el("div", { class: "content", "data-testid": "compare-content" });
    const label = el("div", { class: "side-label", text: order.indexOf(side) === 0 ? "Left" : "Right" });
    cols[side] = { content, label, text: "" };
    panel.appendChild(el("div", { class: "col streaming" }, label, content));
  }
  state.pending = panel;
  $("messages").appendChild(panel);
  setBusy(true);
  let results;
  try {
    results = await Promise.all(order.map((side) => streamChat(models[side], prompt, { seed: seeds[side] },
      (text) => { cols[side].text = text; setContent(cols[side].content, text); })));
  } catch (e) {
    showError(e.message);
    state.controllers.forEach((c) => c.abort());  // the other answer's stream too
    state.pending = null;
    setBusy(false);
    return false;
  }
  setBusy(false);
  const out = {};
  order.forEach((side, k) => { out[side] = results[k]; });
  panel.querySelectorAll(".col").forEach((c) => c.classList.remove("streaming"));
  const full = order.filter((side) => out[side].text.trim());
  if (full.length < 2) {
    // An empty answer (Stop before its first token) is nothing to compare: no vote is stored. The
    // conversation goes on with the other answer if it has text; with neither, the turn is taken back.
    state.pending = null;
    const stopped = order.some((side) => out[side].finish === "stopped");
    if (!full.length) {
      showError(stopped ? STOPPED_EARLY : "Both answers came back empty: nothing was kept.");
      return false;
    }
    showError((stopped ? "Stopped" : "One answer came back empty") + " before both answers had text: no vote; the conversation goes on with the other.");
    state.messages.push({ role: "assistant", content: out[full[0]].text, model: out[full[0]].model });
    render();
    await save();
    return true;
  }
  const votes = el("div", { class: "votes", "data-testid": "votes" });
  const choices = [["left", "⬅ Left is better"], ["right", "Right is better ➡"], ["tie", "Tie"], ["both_bad", "Both bad"]];
  for (const [choice, label] of choices) {
    votes.appendChild(el("button", { type: "button", "data-testid": "vote-" + choice, onclick: async () => {
      const winner = choice === "left" ? order[0] : choice === "right" ? order[1] : choice;
      votes.querySelectorAll("button").forEach((b) => { b.disabled = true; });
      try {
        // A first-turn vote needs the conversation saved first, so that the vote names it.
        if (!state.convId) await save();
        await api("/ui/votes", {
          prompt, answer_a: out.a.text, answer_b: out.b.text, model_a: out.a.model, model_b: out.b.model,
          sampling: sampling(), seed_a: seeds.a, seed_b: seeds.b, a_left: aLeft, winner, rater: raterId(),
          conversation_id: state.convId,
        });
      } catch (e) {
        showError(e.message);
        votes.querySelectorAll("button").forEach((b) => { b.disabled = false; });
        return;
      }
      state.pending = null;
      for (const side of order) cols[side].label.textContent += " — " + out[side].model;
      votes.replaceChildren(el("span", { class: "voted", "data-testid": "voted", text: "Thanks — vote saved." }));
      // The conversation goes on with the preferred answer (the left one after a tie or both-bad).
      const keep = winner === "a" || winner === "b" ? winner : order[0];
      state.messages.push({ role: "assistant", content: out[keep].text, model: out[keep].model });
      await save();
      setTimeout(render, 600);
    } }, label));
  }
  panel.appendChild(votes);
  return true;
}

// ---------------------------------------------------------------- history and setup

async function loadHistory() {
  try {
    const res = await api("/ui/conversations?rater=" + encodeURIComponent(raterId()));
    $("history").replaceChildren(...res.data.map((c) => el("li", {},
      el("a", { href: "#" + c.id, "data-id": String(c.id), class: c.id === state.convId ? "current" : "",
        onclick: (e) => { e.preventDefault(); openConversation(c.id); } }, c.title || "(untitled)"))));
  } catch (e) {
    showError(e.message);
  }
}

async function openConversation(id) {
  const conv = await api("/ui/conversations/" + id);
  state.convId = conv.id;
  state.pending = null;  // leaving a compare panel unvoted
  $("system").value = conv.system || "";
  state.messages = conv.messages;
  location.hash = String(conv.id);
  render();
  loadHistory();
}

function newChat() {
  state.convId = null;
  state.messages = [];
  state.pending = null;
  location.hash = "";
  render();
  loadHistory();
}

// The server's active version, whichever it is when the request arrives: after a promote or a rollback an
// open page follows it instead of chatting on with the version it saw at load time.
const DEFAULT = "default";

function fillPickers(active) {
  state.active = active;
  for (const id of ["model", "model-a", "model-b"]) {
    const sel = $(id), was = sel.value;
    const fixed = state.versions.map((v) => el("option", { value: v }, v + (v === active ? " (active)" : "")));
    const follow = id === "model-b" ? [] : [el("option", { value: DEFAULT }, `active version (${active})`)];
    sel.replaceChildren(...follow, ...fixed);
    sel.value = was || (id === "model-b" ? active : DEFAULT);
  }
}

async function init() {
  const cfg = await api("/ui/config");
  state.versions = cfg.versions;
  $("key-label").hidden = !cfg.auth;
  fillPickers(cfg.active);
  if (cfg.versions.length > 1) $("model-b").value = cfg.versions.find((v) => v !== cfg.active);
  $("compare").addEventListener("change", () => { $("compare-models").hidden = !$("compare").checked; });
  $("api-key").addEventListener("change", () => localStorage.setItem("chatforge.key", $("api-key").value));
  $("new-chat").addEventListener("click", newChat);
  $("stop").addEventListener("click", () => state.controllers.forEach((c) => c.abort()));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.busy) return;
    if (state.pending) return showError(VOTE_FIRST);
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  window.addEventListener("hashchange", () => {
    const id = Number(location.hash.slice(1));
    if (id && id !== state.convId) openConversation(id).catch((e) => showError(e.message));
  });
  const fromHash = Number(location.hash.slice(1));
  if (fromHash) await openConversation(fromHash);
  else loadHistory();
  document.body.dataset.ready = "1";
}

init().catch((e) => showError(e.message));
