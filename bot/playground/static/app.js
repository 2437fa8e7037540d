// The playground page: plain JavaScript, no build step. The server does the Telegram part; this file
// only asks it to send things and draws what it reports (its event log, polled).
"use strict";

const STORE = "playground:v1";
const TOPICS = [[null, "General"], [2, "Ideas"], [3, "Off-topic"]];
const KEEP_MESSAGES = 300;

const $ = (id) => document.getElementById(id);
let info = null;
let state = load();

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE));
    if (saved && Array.isArray(saved.chats)) return saved;
  } catch (e) { /* a damaged store starts over */ }
  return {
    chats: [], messages: {}, sessions: {}, keyboards: {}, current: null, topic: null, sender: null, epoch: null,
    after: 0,
  };
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(state));
}

async function api(name, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch("/playground/api/" + name, init);
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.status);
  return answer;
}

function currentChat() {
  return state.chats.find((c) => c.id === state.current) || null;
}

function chatRef(chat) {
  return { id: chat.id, type: chat.type, title: chat.title, is_forum: chat.is_forum };
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// --- a bot's message: its formatting and its buttons ---
// The server hands a message as Telegram does, text and entities (parse_mode already read): it is drawn
// with DOM nodes and textContent only, so nothing in it is ever parsed as HTML. Offsets are UTF-16 code
// units, as JavaScript's string indices are.

const ENTITY_TAGS = {
  bold: "b", italic: "i", underline: "u", strikethrough: "s", spoiler: "span", code: "code", pre: "pre",
  text_link: "a", blockquote: "blockquote", expandable_blockquote: "blockquote",
};

function safeUrl(url) {
  try {
    const parsed = new URL(url);
    return ["http:", "https:", "tg:", "mailto:"].includes(parsed.protocol) ? parsed.href : null;
  } catch (e) {
    return null;
  }
}

function wrap(entity, child) {
  const tag = ENTITY_TAGS[entity.type];
  if (!tag) return child;
  const node = document.createElement(tag);
  if (entity.type === "spoiler") {
    node.className = "spoiler";
    node.title = "spoiler: click to show";
    node.addEventListener("click", () => node.classList.add("shown"));
  }
  if (tag === "a") {
    const url = safeUrl(entity.url);
    if (!url) return child;  // javascript: and the like stay text
    node.href = url;
    node.target = "_blank";
    node.rel = "noopener noreferrer";
  }
  node.append(child);
  return node;
}

function formatted(text, entities) {
  const list = Array.isArray(entities) ? entities : [];
  const cuts = new Set([0, text.length]);
  for (const e of list) { cuts.add(e.offset); cuts.add(e.offset + e.length); }
  const points = [...cuts].filter((n) => n >= 0 && n <= text.length).sort((a, b) => a - b);
  const out = el("p", { class: "text" });
  for (let i = 0; i + 1 < points.length; i++) {
    const [from, to] = [points[i], points[i + 1]];
    let node = document.createTextNode(text.slice(from, to));
    // Innermost (latest start, then shortest) first, so the outer entities wrap it.
    const covering = list.filter((e) => e.offset <= from && e.offset + e.length >= to)
      .sort((a, b) => (b.offset - a.offset) || (a.length - b.length));
    for (const entity of covering) node = wrap(entity, node);
    out.append(node);
  }
  return out;
}

function inlineKeyboard(chatId, message) {
  if (!Array.isArray(message.keyboard)) return null;
  return el("div", { class: "keyboard inline" }, ...message.keyboard.map((row) => el("div", { class: "keys" },
    ...row.map((button) => {
      if (typeof button.callback_data === "string") {
        return el("button", {
          type: "button", class: "key", "data-callback": button.callback_data,
          onclick: () => press(chatId, message.message_id, button.callback_data),
        }, button.text);
      }
      const url = button.url ? safeUrl(button.url) : null;
      if (url) return el("a", { class: "key", href: url, target: "_blank", rel: "noopener noreferrer" }, button.text);
      return el("button", { type: "button", class: "key", disabled: "disabled", title: "not in the playground" }, button.text);
    }))));
}

function replyKeyboard() {
  const chat = currentChat();
  const markup = chat ? state.keyboards[chat.id] : null;
  const box = $("reply-keyboard");
  $("text").placeholder = (markup && markup.input_field_placeholder) || "Message";
  if (!markup || !Array.isArray(markup.keyboard)) { box.replaceChildren(); box.hidden = true; return; }
  box.hidden = false;
  box.replaceChildren(...markup.keyboard.map((row) => el("div", { class: "keys" }, ...row.map((button) => {
    const label = typeof button === "string" ? button : button.text;
    return el("button", {
      type: "button", class: "key",
      onclick: () => {
        if (markup.one_time_keyboard) { delete state.keyboards[chat.id]; save(); replyKeyboard(); }
        send(label);
      },
    }, label);
  }))));
}

function findBotMessage(chatId, messageId) {
  return messagesOf(chatId).find((m) => m.kind === "bot" && m.message_id === messageId) || null;
}

// --- events from the server ---

function messagesOf(chatId) {
  return (state.messages[chatId] = state.messages[chatId] || []);
}

function push(chatId, message) {
  const list = messagesOf(chatId);
  list.push(message);
  if (list.length > KEEP_MESSAGES) list.splice(0, list.length - KEEP_MESSAGES);
}

function findUpdate(updateId) {
  for (const list of Object.values(state.messages)) {
    const found = list.find((m) => m.update_id === updateId);
    if (found) return found;
  }
  return null;
}

function apply(event) {
  switch (event.kind) {
    case "chat":
      if (!state.chats.some((c) => c.id === event.chat.id)) state.chats.push(event.chat);
      if (event.upgraded_from !== undefined) {
        const old = state.chats.find((c) => c.id === event.upgraded_from);
        if (old) old.upgraded_to = event.chat.id;
        if (state.current === event.upgraded_from) state.current = event.chat.id;
      }
      if (state.current === null) state.current = event.chat.id;
      break;
    case "update":
      if (!findUpdate(event.update_id)) {
        push(event.chat_id, { kind: "in", update_id: event.update_id, sender: event.sender, text: event.text,
          service: event.service, thread_id: event.thread_id, status: null, redelivered: 0 });
      }
      break;
    case "delivery": {
      const message = findUpdate(event.update_id);
      if (message) { message.status = event.status; message.attempt = event.attempt; }
      break;
    }
    case "redelivery": {
      const message = findUpdate(event.update_id);
      if (message) { message.redelivered += 1; message.status = null; }
      break;
    }
    case "reply":
      push(event.chat_id, {
        kind: "bot", text: event.text, entities: event.entities, keyboard: event.keyboard, photo: event.photo,
        message_id: event.message_id, thread_id: event.thread_id,
      });
      break;
    case "edit": {
      const message = findBotMessage(event.chat_id, event.message_id);
      if (message) {
        if (event.text !== undefined) { message.text = event.text; message.entities = event.entities; }
        message.keyboard = event.keyboard;
        message.edited = true;
      }
      break;
    }
    case "keyboard":
      if (Array.isArray(event.markup.keyboard)) state.keyboards[event.chat_id] = event.markup;
      else if (event.markup.remove_keyboard) delete state.keyboards[event.chat_id];
      else if (event.markup.force_reply) state.keyboards[event.chat_id] = { input_field_placeholder: event.markup.input_field_placeholder };
      break;
    case "press":
      push(event.chat_id, { kind: "press", text: event.sender + " pressed “" + event.data + "”", thread_id: null });
      break;
    case "answer":
      if (event.text) toast(event.text, event.show_alert);
      break;
    case "call": {
      const chatId = Number(event.params && event.params.chat_id);  // a multipart field is a string
      if (Number.isSafeInteger(chatId)) {
        push(chatId, { kind: "call", text: event.method + " " + JSON.stringify(event.params) });
      }
      break;
    }
    case "session":
      state.sessions[event.chat_id] = event.rows;
      break;
  }
}

async function pollForever() {
  for (;;) {
    try {
      const query = new URLSearchParams({ after: state.after, hold: 2 });
      if (state.epoch) query.set("epoch", state.epoch);
      const answer = await api("events?" + query);
      if (answer.epoch !== state.epoch) { state.epoch = answer.epoch; state.after = 0; }
      for (const event of answer.events) { apply(event); state.after = event.seq; }
      setLink(true);
      if (answer.events.length) { save(); render(); }
    } catch (e) {
      setLink(false);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

function setLink(up) {
  const link = $("link");
  link.textContent = up ? "connected" : "bot not reachable, retrying…";
  link.classList.toggle("down", !up);
}

// --- drawing ---

function describe(chat) {
  const kind = chat.type === "supergroup" && chat.is_forum ? "supergroup with topics" : chat.type;
  return kind + " · id " + chat.id + (chat.upgraded_to ? " · upgraded" : "");
}

function renderChats() {
  const list = $("chat-list");
  list.replaceChildren(...state.chats.map((chat) => el("li", {},
    el("button", {
      type: "button", class: "chat" + (chat.id === state.current ? " current" : ""),
      "aria-current": chat.id === state.current ? "true" : "false",
      onclick: () => { state.current = chat.id; state.topic = null; save(); render(); refreshSession(); },
    }, el("span", { class: "title" }, chat.title), el("span", { class: "meta" }, describe(chat))))));
}

function serviceText(message) {
  const service = message.service || {};
  if (service.migrate_to_chat_id) return "Group upgraded to a supergroup (migrate_to_chat_id " + service.migrate_to_chat_id + ")";
  if (service.migrate_from_chat_id) return "Supergroup created from a group (migrate_from_chat_id " + service.migrate_from_chat_id + ")";
  return JSON.stringify(service);
}

function statusText(message) {
  if (message.status === null) return "sending…";
  const again = message.redelivered ? " · delivered again ×" + message.redelivered : "";
  const tries = message.attempt > 1 ? " after " + message.attempt + " tries" : "";
  return (message.status >= 200 && message.status < 300 ? "✓ " : "✗ ") + message.status + tries + again;
}

function renderMessage(message, chatId) {
  if (message.kind === "bot") {
    return el("li", { class: "msg bot" + (message.edited ? " edited" : ""), "data-message": message.message_id },
      el("span", { class: "who" }, "bot"),
      message.photo ? el("img", { class: "photo", src: message.photo, alt: "photo from the bot" }) : null,
      message.text ? formatted(message.text, message.entities) : null,
      message.edited ? el("span", { class: "status" }, "edited") : null,
      inlineKeyboard(chatId, message));
  }
  if (message.kind === "press") return el("li", { class: "msg service press" }, el("p", {}, message.text));
  if (message.kind === "call") return el("li", { class: "msg service" }, el("p", {}, "bot called " + message.text));
  if (message.service) {
    return el("li", { class: "msg service", "data-update": message.update_id },
      el("p", {}, serviceText(message)), el("span", { class: "status" }, statusText(message)));
  }
  return el("li", { class: "msg in", "data-update": message.update_id },
    message.sender ? el("span", { class: "who" }, message.sender) : null,
    el("p", {}, message.text),
    el("div", { class: "foot" },
      el("span", { class: "status" }, statusText(message)),
      el("button", {
        type: "button", class: "redeliver", "aria-label": "Deliver update " + message.update_id + " again",
        onclick: () => api("redeliver", { update_id: message.update_id }).catch(report),
      }, "Deliver again")));
}

function renderConversation() {
  const chat = currentChat();
  $("chat-title").textContent = chat ? chat.title : "No chat yet";
  $("chat-meta").textContent = chat ? describe(chat) : "";
  $("upgrade").hidden = !chat || chat.type !== "group" || Boolean(chat.upgraded_to);
  const forum = Boolean(chat && chat.is_forum);
  $("topics").hidden = !forum;
  // A channel posts as itself; a private chat has one user, who is the one typing.
  const fixed = Boolean(chat && (chat.type === "channel" || chat.type === "private"));
  $("sender").disabled = fixed;
  $("sender").title = fixed ? "Fixed by the kind of chat" : "";
  const shown = chat ? messagesOf(chat.id).filter((m) => !forum || (m.thread_id ?? null) === state.topic) : [];
  const list = $("messages");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
  list.replaceChildren(...shown.map((m) => renderMessage(m, chat.id)));
  replyKeyboard();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function renderSession() {
  const chat = currentChat();
  const rows = chat ? state.sessions[chat.id] : null;
  const box = $("session-rows");
  if (!rows) { box.replaceChildren(el("p", { class: "meta" }, "Send something to see the stored row.")); return; }
  if (!rows.length) { box.replaceChildren(el("p", { class: "meta" }, "This storage cannot be read from outside.")); return; }
  box.replaceChildren(...rows.map((row) => el("dl", { class: "row" },
    el("dt", {}, "key"), el("dd", {}, el("code", {}, row.key)),
    ...(row.stored ? [
      el("dt", {}, "data"), el("dd", {}, el("code", { class: "data" }, JSON.stringify(row.data))),
      el("dt", {}, "version"), el("dd", {}, String(row.version)),
      el("dt", {}, "updated"), el("dd", {}, new Date(row.updated_at).toLocaleTimeString()),
    ] : [el("dt", {}, "data"), el("dd", {}, "no row")]))));
}

function render() {
  renderChats();
  renderConversation();
  renderSession();
}

function report(error) {
  $("link").textContent = "error: " + error.message;
}

function toast(text, alert) {
  const box = $("toast");
  box.textContent = text;
  box.className = "toast" + (alert ? " alert" : "");
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, alert ? 6000 : 3000);
}

// --- controls ---

function sendBody(text) {
  const chat = currentChat();
  return { chat: chatRef(chat), text, sender: state.sender, thread_id: chat.is_forum ? state.topic : null };
}

function send(text) {
  if (!currentChat() || !text) return Promise.resolve();
  return api("send", sendBody(text)).catch(report);
}

function press(chatId, messageId, data) {
  const chat = state.chats.find((c) => c.id === chatId);
  if (!chat) return Promise.resolve();
  return api("press", { chat: chatRef(chat), message_id: messageId, data, sender: state.sender }).catch(report);
}

async function refreshSession() {
  const chat = currentChat();
  if (!chat) return;
  try {
    state.sessions[chat.id] = (await api("peek", { chat: chatRef(chat), sender: state.sender })).rows;
    save();
    renderSession();
  } catch (e) { report(e); }
}

async function createChat(type, title) {
  const forum = type === "forum";
  const answer = await api("chats", { type: forum ? "supergroup" : type, title, forum, sender: state.sender });
  apply({ kind: "chat", chat: answer.chat });
  state.current = answer.chat.id;
  state.topic = null;
  save();
  render();
  refreshSession();
}

function setup() {
  $("bot-name").textContent = "@" + info.username;
  const people = info.people;
  if (!people.some((p) => p.id === state.sender)) state.sender = people[0].id;
  $("sender").replaceChildren(...people.map((p) => el("option", { value: p.id }, p.first_name)));
  $("sender").value = String(state.sender);
  $("sender").addEventListener("change", () => { state.sender = Number($("sender").value); save(); });
  $("topic").replaceChildren(...TOPICS.map(([id, name]) => el("option", { value: id === null ? "" : id }, name)));
  $("topic").addEventListener("change", () => {
    state.topic = $("topic").value === "" ? null : Number($("topic").value);
    save();
    renderConversation();
  });
  // The app's examples; the first one also goes twenty at once, as parallel deliveries.
  const [first] = info.quick;
  $("quick").replaceChildren(
    ...info.quick.map((text) => el("button", { type: "button", class: "quick-send", onclick: () => send(text) }, text)),
    first === undefined ? null : el("button", {
      type: "button", id: "burst",
      onclick: () => currentChat() && api("burst", { ...sendBody(first), count: 20 }).catch(report),
    }, "Send 20 " + first + " at once"));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    $("text").value = "";
    send(text);
  });
  $("new-chat").addEventListener("submit", (event) => {
    event.preventDefault();
    createChat($("new-type").value, $("new-title").value.trim()).catch(report);
    $("new-title").value = "";
  });
  $("upgrade").addEventListener("click", () => {
    const chat = currentChat();
    if (chat) api("upgrade", { chat: chatRef(chat), sender: state.sender }).catch(report);
  });
}

async function main() {
  for (;;) {
    try { info = await api("info"); break; } catch (e) {
      setLink(false);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  setup();
  render();
  if (!state.chats.length) await createChat("group", "First group").catch(report);
  else refreshSession();
  pollForever();
}

main();
