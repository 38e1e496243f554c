/* clawbus web chat: a small client of the gateway's WebSocket protocol (SPEC §4).
 *
 * connect.challenge -> connect {auth} -> hello-ok; then agent / chat.abort /
 * sessions.list / chat.history over the socket, and GET /v1/models (bearer) for
 * the agent picker. The secret lives in sessionStorage only (never in a URL or a
 * log line). Replies are Markdown rendered by marked, with raw HTML shown as
 * text, then sanitised by DOMPurify before they touch the DOM.
 *
 * Images (the attach button, a paste or a drop on the composer) are read into
 * data: URLs by FileReader and sent in `agent`'s `images`; the only image URLs
 * this page ever puts into the DOM are those, set through `img.src`. The
 * transcript keeps a placeholder per image, so the history shows that text.
 *
 * The page asks for the agent's tool steps (connect caps ["tool-events"]) and
 * shows each as a collapsible item in the reply, where it happened between the
 * streamed text; chat.history's tool calls and results render the same way.
 * Tool names, arguments and results only ever reach the DOM as textContent.
 */
"use strict";

(() => {
  const STORAGE_KEY = "clawbus.secret";
  const PROTOCOL = 3;
  const REQUEST_TIMEOUT_MS = 15000;
  const RECONNECT_MIN_MS = 500;
  const RECONNECT_MAX_MS = 10000;
  const MB = 1024 * 1024;
  const MAX_IMAGES = 8;                 // the gateway's limit per turn
  const MAX_IMAGE_BYTES = 10 * MB;
  // A WebSocket frame is limited to 16 MiB and base64 adds a third.
  const MAX_IMAGES_TOTAL_BYTES = 11 * MB;

  const $ = (id) => document.getElementById(id);
  const ui = {
    conn: $("conn"), signOut: $("sign-out"), banner: $("banner"),
    signinView: $("signin-view"), signinForm: $("signin-form"), secret: $("secret"),
    signinButton: $("signin-button"), authError: $("auth-error"),
    chatView: $("chat-view"), agent: $("agent"), newSession: $("new-session"),
    refreshSessions: $("refresh-sessions"), sessions: $("sessions"),
    sessionTitle: $("session-title"), messages: $("messages"), composer: $("composer"),
    input: $("input"), send: $("send"), stop: $("stop"),
    attach: $("attach"), attachInput: $("attach-input"), attachments: $("attachments"),
    attachError: $("attach-error"),
  };

  const state = {
    secret: null,            // the signed-in secret ("" when the gateway has no auth)
    ws: null,                // the current, authenticated socket
    signedIn: false,
    nextId: 1,
    pending: new Map(),      // request id -> {resolve, reject, onAccepted?, timer?}
    runsById: new Map(),     // runId -> live run
    liveRuns: new Map(),     // sessionKey -> live run (at most one per session)
    agents: [],
    defaultAgent: null,
    sessionKey: null,        // the session on screen
    sessionAgent: null,
    sessionCache: [],        // last sessions.list answer
    viewToken: 0,            // guards against stale chat.history answers
    reconnectDelay: RECONNECT_MIN_MS,
    reconnectTimer: null,
    bannerTimer: null,
    attachments: [],         // images to send: {name, size, dataUrl (null while read)}
  };

  // -- rendering ------------------------------------------------------------

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  // Raw HTML in a reply is shown as text, never interpreted.
  window.marked.use({
    gfm: true,
    breaks: false,
    renderer: {
      html(token) {
        const text = escapeHtml(token.text);
        return token.block ? `<p class="raw-html">${text}</p>` : text;
      },
    },
  });

  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  function renderMarkdown(text) {
    const html = window.marked.parse(text || "", { async: false });
    return window.DOMPurify.sanitize(html, {
      USE_PROFILE: { html: true },
      FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option"],
      FORBID_ATTR: ["style"],
      RETURN_DOM_FRAGMENT: true,
    });
  }

  function messageNode(role) {
    const wrap = document.createElement("article");
    wrap.className = `msg ${role}`;
    wrap.dataset.role = role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "body";
    const meta = document.createElement("div");
    meta.className = "meta";
    wrap.append(who, body, meta);
    return { wrap, body, meta };
  }

  function imageNode(attachment) {
    const img = document.createElement("img");
    img.src = attachment.dataUrl;   // a data:image/… URL this page read from the file
    img.alt = attachment.name;
    return img;
  }

  function userMessage(text, images = []) {
    const node = messageNode("user");
    if (images.length) {
      const row = document.createElement("div");
      row.className = "images";
      row.append(...images.map(imageNode));
      node.body.before(row);
    }
    node.body.textContent = text;
    return node;
  }

  // -- agent tool steps (SPEC §9) --------------------------------------------

  const STEP_STATUS = { running: "running…", done: "done", error: "error", stopped: "no result" };

  /** JSON text indented when it parses to an object or an array; else as it came. */
  function prettyJson(text) {
    try {
      const value = JSON.parse(text);
      if (value !== null && typeof value === "object") return JSON.stringify(value, null, 2);
    } catch { /* not JSON: shown as it is */ }
    return text;
  }

  function stepBlock(label, cls, text) {
    const block = document.createElement("div");
    block.className = `tool-block ${cls}`;
    const head = document.createElement("div");
    head.className = "tool-label";
    head.textContent = label;
    const pre = document.createElement("pre");
    pre.textContent = prettyJson(text);
    block.append(head, pre);
    return block;
  }

  /** One tool call of the agent: a <details> whose summary names the tool and
   * its status, and whose body shows the arguments, then the result. */
  class ToolStep {
    constructor(name, args) {
      this.el = document.createElement("details");
      this.el.className = "tool-step";
      const summary = document.createElement("summary");
      const icon = document.createElement("span");
      icon.className = "tool-icon";
      icon.setAttribute("aria-hidden", "true");
      const title = document.createElement("span");
      title.className = "tool-name";
      title.textContent = name || "tool";
      this.status = document.createElement("span");
      this.status.className = "tool-status";
      summary.append(icon, title, this.status);
      this.el.append(summary);
      if (typeof args === "string") this.el.append(stepBlock("Arguments", "tool-args", args));
      this.setStatus("running");
    }

    get running() { return this.el.dataset.status === "running"; }

    setStatus(status) {
      this.el.dataset.status = status;
      this.el.setAttribute("aria-busy", String(status === "running"));
      this.status.textContent = STEP_STATUS[status];
    }

    setResult(isError, text) {
      const old = this.el.querySelector(".tool-result");
      if (old) old.remove();
      const block = stepBlock(isError ? "Error" : "Result", "tool-result", String(text ?? ""));
      if (isError) block.classList.add("error");
      this.el.append(block);
      this.setStatus(isError ? "error" : "done");
    }
  }

  class TextSegment {
    constructor() {
      this.text = "";
      this.el = document.createElement("div");
      this.el.className = "segment";
      this.dirty = false;
    }
  }

  /** An assistant reply's body: its text and tool steps in the order they came.
   * Without steps the Markdown goes straight into the body; the first step
   * splits the body into text segments around the steps, so text streamed before
   * a step stays above it. */
  class ReplyBody {
    constructor(body) {
      this.body = body;
      this.text = "";          // all the text, in order
      this.parts = [];         // TextSegment and ToolStep, in order
      this.steps = new Map();  // toolCallId -> ToolStep
      this.segmented = false;
    }

    addText(text) {
      if (!text) return;
      this.text += text;
      let last = this.parts[this.parts.length - 1];
      if (!(last instanceof TextSegment)) {
        last = new TextSegment();
        this.parts.push(last);
        if (this.segmented) this.body.append(last.el);
      }
      last.text += text;
      last.dirty = true;
    }

    startStep(name, callId, args) {
      if (!this.segmented) {
        this.segmented = true;
        this.body.replaceChildren(...this.parts.map((p) => p.el));
        this.render();
      }
      const step = new ToolStep(name, args);
      this.parts.push(step);
      if (callId) this.steps.set(callId, step);
      this.body.append(step.el);
      return step;
    }

    /** The result of a step; a result whose start was never seen gets a step of its own. */
    finishStep(name, callId, isError, result) {
      const step = this.steps.get(callId) || this.startStep(name, callId, null);
      step.setResult(isError, result);
    }

    get running() { return [...this.steps.values()].some((s) => s.running); }

    /** Steps still running when the reply ends will get no result. */
    stopSteps() {
      for (const step of this.steps.values()) if (step.running) step.setStatus("stopped");
    }

    /** Take the run's final text: it replaces the text of a reply without steps;
     * with steps it can only add what the stream did not bring. */
    settle(text) {
      if (!this.segmented) {
        this.text = "";
        this.parts = [];
        this.addText(text);
      } else if (text.startsWith(this.text)) {
        this.addText(text.slice(this.text.length));
      }
    }

    render() {
      if (!this.segmented) {
        this.body.replaceChildren(renderMarkdown(this.text));
        return;
      }
      for (const part of this.parts) {
        if (part instanceof TextSegment && (part.dirty || !part.el.hasChildNodes())) {
          part.el.replaceChildren(renderMarkdown(part.text));
          part.dirty = false;
        }
      }
    }
  }

  // The transcript keeps a failed call's result as the model saw it.
  const STORED_ERROR = "Error: ";

  /** chat.history's messages as bubbles: each user message, and per run one reply
   * holding its assistant text and, as steps, its tool calls with their results. */
  function historyNodes(history) {
    const nodes = [];
    const replies = [];
    const steps = new Map();   // toolCallId -> ToolStep (a client's result may come a turn later)
    let current = null;
    const replyFor = (m) => {
      if (!current || current.runId !== m.runId) {
        const node = messageNode("assistant");
        node.wrap.dataset.state = "history";
        current = { runId: m.runId, node, body: new ReplyBody(node.body) };
        replies.push(current);
        nodes.push(node.wrap);
      }
      return current;
    };
    for (const m of history) {
      if (m.role === "user") {
        current = null;
        const node = userMessage(m.content);
        node.wrap.dataset.state = "history";
        nodes.push(node.wrap);
      } else if (m.role === "tool") {
        const text = String(m.content ?? "");
        const step = steps.get(m.toolCallId)
          || replyFor(m).body.startStep(m.name, m.toolCallId, null);
        step.setResult(text.startsWith(STORED_ERROR), text);
      } else {
        const reply = replyFor(m);
        const content = m.content || "";
        reply.body.addText(reply.body.text && content ? `\n\n${content}` : content);
        for (const call of m.toolCalls || []) {
          steps.set(call.id, reply.body.startStep(call.name, call.id, call.arguments));
        }
        const usage = usageText(m.usage);
        if (usage) addMeta(reply.node.meta, "usage", usage);
      }
    }
    for (const reply of replies) {
      reply.body.stopSteps();
      reply.body.render();
    }
    return nodes;
  }

  function addMeta(meta, cls, text) {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    meta.append(span);
  }

  function usageText(usage) {
    if (!usage) return null;
    const p = usage.prompt_tokens ?? 0;
    const c = usage.completion_tokens ?? 0;
    const t = usage.total_tokens ?? p + c;
    return `${p} in · ${c} out · ${t} tokens`;
  }

  function scrollToEnd() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function showBanner(kind, text, hideAfterMs) {
    clearTimeout(state.bannerTimer);
    ui.banner.dataset.kind = kind;
    ui.banner.textContent = text;
    ui.banner.hidden = false;
    if (hideAfterMs) {
      state.bannerTimer = setTimeout(() => { ui.banner.hidden = true; }, hideAfterMs);
    }
  }

  function hideBanner() {
    clearTimeout(state.bannerTimer);
    ui.banner.hidden = true;
    delete ui.banner.dataset.kind;
  }

  function setConn(s, text) {
    ui.conn.dataset.state = s;
    ui.conn.textContent = text;
  }

  function showAuthError(text) {
    ui.authError.textContent = text;
    ui.authError.hidden = false;
  }

  // -- the socket -----------------------------------------------------------

  function newId(prefix) {
    state.nextId += 1;
    return `${prefix}${state.nextId}`;
  }

  function randomHex(bytes) {
    const buf = new Uint8Array(bytes);
    crypto.getRandomValues(buf);
    return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function authFailure(error) {
    const code = error && error.code;
    if (code === "unauthorized") {
      return { kind: "auth", message: "Wrong token or password." };
    }
    if (code === "rate_limited") {
      return { kind: "auth", message: "Too many failed sign-in attempts. Try again later." };
    }
    return { kind: "auth", message: (error && error.message) || "Sign-in refused." };
  }

  /** Open a socket and authenticate; resolves with the socket after hello-ok. */
  function openSocket(secret) {
    return new Promise((resolve, reject) => {
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      let ws;
      try {
        ws = new WebSocket(`${scheme}${location.host}/`);
      } catch (err) {
        reject({ kind: "network", message: "Cannot open a WebSocket to the gateway." });
        return;
      }
      const connectId = newId("c");
      let settled = false;
      let hello = false;
      ws.onmessage = (ev) => {
        let frame;
        try { frame = JSON.parse(ev.data); } catch { return; }
        if (hello) {
          if (ws === state.ws) onFrame(frame);
          return;
        }
        if (frame.type === "event" && frame.event === "connect.challenge") {
          const auth = secret ? { token: secret, password: secret } : {};
          ws.send(JSON.stringify({
            type: "req", id: connectId, method: "connect",
            params: {
              minProtocol: PROTOCOL, maxProtocol: PROTOCOL,
              client: { id: "clawbus-web", version: "1", platform: "web", mode: "webchat" },
              caps: ["tool-events"],   // the agent's tool steps, shown in the reply
              auth,
            },
          }));
        } else if (frame.type === "res" && frame.id === connectId) {
          settled = true;
          if (frame.ok) {
            hello = true;
            resolve(ws);
          } else {
            reject(authFailure(frame.error));
          }
        }
      };
      ws.onerror = () => { /* a close event follows */ };
      ws.onclose = (ev) => {
        if (!settled) {
          settled = true;
          reject(ev.code === 1008
            ? { kind: "auth", message: ev.reason || "Sign-in refused." }
            : { kind: "network", message: "Cannot reach the gateway." });
        } else if (hello && ws === state.ws) {
          onSocketLost();
        }
      };
    });
  }

  function send(frame) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      throw { code: "DISCONNECTED", message: "Not connected to the gateway." };
    }
    ws.send(JSON.stringify(frame));
  }

  /** One request; resolves with the payload of its (final) res. For `agent`,
   * `onAccepted` gets the first ("accepted") res and the promise the final one. */
  function request(method, params, { onAccepted, timeout = REQUEST_TIMEOUT_MS } = {}) {
    return new Promise((resolve, reject) => {
      const id = newId("r");
      const entry = { resolve, reject, onAccepted, timer: null };
      if (timeout) {
        entry.timer = setTimeout(() => {
          state.pending.delete(id);
          reject({ code: "TIMEOUT", message: `${method}: no answer from the gateway.` });
        }, timeout);
      }
      state.pending.set(id, entry);
      try {
        send({ type: "req", id, method, params: params || {} });
      } catch (err) {
        clearTimeout(entry.timer);
        state.pending.delete(id);
        reject(err);
      }
    });
  }

  function onFrame(frame) {
    if (frame.type === "res") {
      const entry = state.pending.get(frame.id);
      if (!entry) return;
      // Any answer stops the request timer: after `agent`'s accepted res the
      // final one may take as long as the run does.
      clearTimeout(entry.timer);
      if (frame.ok && entry.onAccepted && frame.payload && frame.payload.status === "accepted") {
        const onAccepted = entry.onAccepted;
        entry.onAccepted = null;   // the next res with this id is the final one
        onAccepted(frame.payload);
        return;
      }
      state.pending.delete(frame.id);
      if (frame.ok) entry.resolve(frame.payload); else entry.reject(frame.error || {});
    } else if (frame.type === "event" && frame.event === "agent" && frame.payload) {
      const run = state.runsById.get(frame.payload.runId);
      if (run) run.onEvent(frame.payload);
    }
  }

  function failPending(error) {
    for (const [id, entry] of state.pending) {
      clearTimeout(entry.timer);
      state.pending.delete(id);
      entry.reject(error);
    }
  }

  function onSocketLost() {
    state.ws = null;
    failPending({ code: "DISCONNECTED", message: "Connection to the gateway lost." });
    if (state.signedIn) scheduleReconnect();
  }

  function scheduleReconnect() {
    clearTimeout(state.reconnectTimer);
    const delay = state.reconnectDelay;
    state.reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_MS);
    setConn("reconnecting", "reconnecting…");
    showBanner("disconnected",
      `Connection to the gateway lost. Reconnecting in ${Math.ceil(delay / 1000)} s…`);
    state.reconnectTimer = setTimeout(reconnect, delay);
  }

  async function reconnect() {
    if (!state.signedIn) return;
    let ws;
    try {
      ws = await openSocket(state.secret);
    } catch (err) {
      if (!state.signedIn) return;
      if (err.kind === "auth") {
        signOut(err.message);
      } else {
        scheduleReconnect();
      }
      return;
    }
    if (!state.signedIn) { ws.close(1000); return; }
    state.ws = ws;
    state.reconnectDelay = RECONNECT_MIN_MS;
    setConn("online", "connected");
    showBanner("reconnected", "Reconnected.", 3000);
    refreshSessions();   // the conversation on screen stays as it is
  }

  // -- sign in / out --------------------------------------------------------

  async function signIn(secret, { automatic = false } = {}) {
    ui.authError.hidden = true;
    ui.signinButton.disabled = true;
    ui.signinButton.textContent = "Signing in…";
    setConn("connecting", "connecting…");
    let ws;
    try {
      ws = await openSocket(secret);
    } catch (err) {
      ui.signinButton.disabled = false;
      ui.signinButton.textContent = "Sign in";
      setConn("offline", "offline");
      if (err.kind === "auth") {
        sessionStorage.removeItem(STORAGE_KEY);
        showAuthError(err.message);
      } else {
        showAuthError(`${err.message} Is it running?`);
      }
      if (automatic) ui.secret.focus();
      return;
    }
    sessionStorage.setItem(STORAGE_KEY, secret);
    state.secret = secret;
    state.ws = ws;
    state.signedIn = true;
    state.reconnectDelay = RECONNECT_MIN_MS;
    ui.secret.value = "";
    ui.signinButton.disabled = false;
    ui.signinButton.textContent = "Sign in";
    ui.signinView.hidden = true;
    ui.chatView.hidden = false;
    ui.signOut.hidden = false;
    setConn("online", "connected");
    await loadAgents();
    newSession();
    refreshSessions();
    ui.input.focus();
  }

  function signOut(message) {
    state.signedIn = false;
    clearTimeout(state.reconnectTimer);
    sessionStorage.removeItem(STORAGE_KEY);
    state.secret = null;
    const ws = state.ws;
    state.ws = null;
    failPending({ code: "DISCONNECTED", message: "Signed out." });  // ends live runs
    if (ws) ws.close(1000, "sign out");
    ui.chatView.hidden = true;
    ui.signOut.hidden = true;
    ui.signinView.hidden = false;
    ui.messages.replaceChildren();
    ui.sessions.replaceChildren();
    clearAttachments();
    hideBanner();
    setConn("offline", "offline");
    if (message) showAuthError(message); else ui.authError.hidden = true;
    ui.secret.focus();
  }

  // -- agents and sessions --------------------------------------------------

  async function loadAgents() {
    let ids = null;
    try {
      const headers = state.secret ? { Authorization: `Bearer ${state.secret}` } : {};
      const resp = await fetch("/v1/models", { headers, cache: "no-store", credentials: "omit" });
      if (resp.ok) {
        const body = await resp.json();
        ids = (body.data || []).map((m) => m.id)
          .filter((id) => id.startsWith("openclaw/") && id !== "openclaw/default")
          .map((id) => id.slice("openclaw/".length));
      }
    } catch { /* fall back to agents.list */ }
    let defaultId = null;
    try {
      const listed = await request("agents.list");
      defaultId = listed.defaultId;
      if (ids === null) ids = (listed.agents || []).map((a) => a.id);
    } catch { /* keep what /v1/models gave */ }
    ids = ids && ids.length ? ids : [defaultId || "main"];
    state.agents = ids;
    state.defaultAgent = defaultId && ids.includes(defaultId) ? defaultId : ids[0];
    ui.agent.replaceChildren(...ids.map((id) => {
      const opt = document.createElement("option");
      opt.value = id;
      opt.textContent = id === state.defaultAgent ? `${id} (default)` : id;
      return opt;
    }));
    ui.agent.value = state.defaultAgent;
  }

  function ensureAgentOption(agentId) {
    if (!agentId || state.agents.includes(agentId)) return;
    state.agents.push(agentId);
    const opt = document.createElement("option");
    opt.value = agentId;
    opt.textContent = agentId;
    ui.agent.append(opt);
  }

  function newSession() {
    const agentId = ui.agent.value || state.defaultAgent;
    const key = `agent:${agentId}:web:${randomHex(6)}`;
    showSession(key, agentId, { fresh: true });
  }

  async function refreshSessions() {
    if (!state.ws) return;
    try {
      const payload = await request("sessions.list");
      state.sessionCache = payload.sessions || [];
    } catch { return; }
    renderSessions();
  }

  function relativeTime(tsSeconds) {
    if (!tsSeconds) return "";
    const s = Math.max(0, Math.round(Date.now() / 1000 - tsSeconds));
    if (s < 60) return "just now";
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(tsSeconds * 1000).toLocaleDateString();
  }

  function renderSessions() {
    const items = [...state.sessionCache];
    if (state.sessionKey && !items.some((s) => s.key === state.sessionKey)) {
      items.unshift({ key: state.sessionKey, agentId: state.sessionAgent, turns: 0, draft: true });
    }
    ui.sessions.replaceChildren(...items.map((s) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "session";
      button.dataset.key = s.key;
      if (s.key === state.sessionKey) button.setAttribute("aria-current", "true");
      const title = document.createElement("span");
      title.className = "key";
      title.textContent = s.draft ? "New session" : s.key;
      title.title = s.key;
      const sub = document.createElement("span");
      sub.className = "sub";
      const bits = [s.agentId, `${s.turns} turn${s.turns === 1 ? "" : "s"}`];
      if (!s.draft) bits.push(relativeTime(s.lastActivity));
      if (state.liveRuns.has(s.key)) bits.push("running…");
      sub.textContent = bits.filter(Boolean).join(" · ");
      button.append(title, sub);
      button.addEventListener("click", () => showSession(s.key, s.agentId));
      li.append(button);
      return li;
    }));
  }

  async function showSession(key, agentId, { fresh = false } = {}) {
    state.sessionKey = key;
    state.sessionAgent = agentId || state.defaultAgent;
    ensureAgentOption(state.sessionAgent);
    ui.agent.value = state.sessionAgent;
    ui.sessionTitle.textContent = key;
    ui.sessionTitle.title = key;
    const token = ++state.viewToken;
    ui.messages.replaceChildren();
    ui.messages.dataset.loading = "true";
    renderSessions();
    updateComposer();
    let history = [];
    if (!fresh && state.ws) {
      try {
        history = (await request("chat.history", { sessionKey: key })).messages || [];
      } catch (err) {
        if (token !== state.viewToken) return;
        showBanner("error", `Could not load the session: ${err.message || err.code}`, 5000);
      }
    }
    if (token !== state.viewToken) return;
    const nodes = historyNodes(history);
    const live = state.liveRuns.get(key);
    if (live) nodes.push(live.userNode.wrap, live.node.wrap);
    ui.messages.replaceChildren(...nodes);
    delete ui.messages.dataset.loading;
    scrollToEnd();
  }

  function updateComposer() {
    const running = state.liveRuns.has(state.sessionKey);
    ui.send.disabled = running;
    ui.stop.disabled = !running;
  }

  // -- images to send -------------------------------------------------------

  function showAttachError(text) {
    ui.attachError.textContent = text;
    ui.attachError.hidden = !text;
  }

  function readDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  /** Check files (from the picker, a paste or a drop), then read the good ones;
   * each refused file is named in a visible message. */
  function addImages(files) {
    const problems = [];
    let total = state.attachments.reduce((n, a) => n + a.size, 0);
    for (const file of files) {
      const name = file.name || "pasted image";
      if (!file.type.startsWith("image/")) {
        problems.push(`${name} is not an image.`);
      } else if (file.size > MAX_IMAGE_BYTES) {
        problems.push(`${name} is larger than ${MAX_IMAGE_BYTES / MB} MB.`);
      } else if (state.attachments.length >= MAX_IMAGES) {
        problems.push(`${name}: at most ${MAX_IMAGES} images per message.`);
      } else if (total + file.size > MAX_IMAGES_TOTAL_BYTES) {
        problems.push(`${name}: at most ${MAX_IMAGES_TOTAL_BYTES / MB} MB of images per message.`);
      } else {
        total += file.size;
        const entry = { name, size: file.size, dataUrl: null };
        state.attachments.push(entry);   // holds its place while it is read
        readAttachment(entry, file);
      }
    }
    showAttachError(problems.join(" "));
  }

  async function readAttachment(entry, file) {
    let url = null;
    try {
      url = await readDataUrl(file);
    } catch { /* reported below */ }
    if (!state.attachments.includes(entry)) return;   // cleared meanwhile (signed out)
    if (typeof url === "string" && url.startsWith("data:image/")) {
      entry.dataUrl = url;
    } else {
      state.attachments = state.attachments.filter((a) => a !== entry);
      showAttachError(`${entry.name} could not be read.`);
    }
    renderAttachments();
  }

  function renderAttachments() {
    const ready = state.attachments.filter((a) => a.dataUrl);
    ui.attachments.replaceChildren(...ready.map((a) => {
      const li = document.createElement("li");
      li.className = "attachment";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.title = `Remove ${a.name}`;
      remove.setAttribute("aria-label", `Remove ${a.name}`);
      remove.addEventListener("click", () => removeAttachment(a));
      li.append(imageNode(a), remove);
      return li;
    }));
    ui.attachments.hidden = ready.length === 0;
  }

  function removeAttachment(entry) {
    state.attachments = state.attachments.filter((a) => a !== entry);
    renderAttachments();
    const next = ui.attachments.querySelector(".remove");
    (next || ui.input).focus();
  }

  function clearAttachments() {
    state.attachments = [];
    renderAttachments();
    showAttachError("");
  }

  const carriesFiles = (ev) => Boolean(ev.dataTransfer)
    && Array.from(ev.dataTransfer.types).includes("Files");

  // -- runs -----------------------------------------------------------------

  function noWorker(error) {
    return error && (error.status === 503 || /no agent worker/i.test(error.message || ""));
  }

  function errorText(error) {
    if (noWorker(error)) {
      return "No agent worker available. Start one with `clawbus worker` " +
        "(or `clawbus up --workers N`) and try again.";
    }
    if (error && error.code === "DISCONNECTED") {
      return "The connection dropped during this reply; the run was cancelled.";
    }
    return (error && error.message) || "The run failed.";
  }

  class Run {
    constructor(sessionKey, agentId, text, images) {
      this.sessionKey = sessionKey;
      this.agentId = agentId;
      this.runId = null;
      this.started = performance.now();
      this.firstToken = null;
      this.abortRequested = false;
      this.renderQueued = false;
      this.finished = false;
      this.userNode = userMessage(text, images);
      this.node = messageNode("assistant");
      this.node.wrap.dataset.state = "waiting";
      this.node.body.classList.add("typing");
      this.reply = new ReplyBody(this.node.body);
    }

    onAccepted(payload) {
      this.runId = payload.runId;
      this.node.wrap.dataset.runId = payload.runId;
      state.runsById.set(payload.runId, this);
      if (this.abortRequested) this.abort();
    }

    onEvent(payload) {
      const data = payload.data;
      if (!data) return;
      if (payload.stream === "assistant" && typeof data.delta === "string") {
        if (this.firstToken === null) this.firstToken = performance.now();
        this.showActivity();
        this.reply.addText(data.delta);
        this.queueRender();
      } else if (payload.stream === "tool" && (data.phase === "start" || data.phase === "result")) {
        this.showActivity();
        if (data.phase === "start") {
          this.reply.startStep(data.name, data.toolCallId, String(data.args ?? ""));
        } else {
          this.reply.finishStep(data.name, data.toolCallId, data.isError === true, data.result);
          // The model has the results: "…" until its next words arrive.
          if (!this.reply.running) this.node.body.classList.add("typing");
        }
        if (this.sessionKey === state.sessionKey) scrollToEnd();
      }
    }

    /** Text or a tool step came: the reply is under way. */
    showActivity() {
      this.node.wrap.dataset.state = "streaming";
      this.node.body.classList.remove("typing");
    }

    queueRender() {
      if (this.renderQueued) return;
      this.renderQueued = true;
      requestAnimationFrame(() => {
        this.renderQueued = false;
        if (this.node.wrap.dataset.state !== "streaming") return;
        this.render();
        if (this.sessionKey === state.sessionKey) scrollToEnd();
      });
    }

    render() {
      this.reply.render();
    }

    abort() {
      this.abortRequested = true;
      if (!this.runId) return;   // sent once the run is accepted
      request("chat.abort", { runId: this.runId }).catch(() => {});
    }

    finish(outcome, detail, result) {
      if (this.finished) return;
      this.finished = true;
      if (state.liveRuns.get(this.sessionKey) === this) state.liveRuns.delete(this.sessionKey);
      if (this.runId) state.runsById.delete(this.runId);
      const { wrap, body, meta } = this.node;
      body.classList.remove("typing");
      if (result && typeof result.text === "string") this.reply.settle(result.text);
      this.reply.stopSteps();
      if (this.reply.text || this.reply.segmented) this.render(); else body.replaceChildren();
      wrap.dataset.state = outcome;
      meta.replaceChildren();
      if (this.firstToken !== null) {
        addMeta(meta, "ttft", `first token ${Math.round(this.firstToken - this.started)} ms`);
      }
      const usage = result ? usageText(result.usage) : null;
      if (usage) addMeta(meta, "usage", usage);
      addMeta(meta, "elapsed", `${((performance.now() - this.started) / 1000).toFixed(1)} s`);
      if (outcome === "aborted") addMeta(meta, "outcome", "stopped");
      if (outcome === "done" && result && result.finishReason === "length") {
        addMeta(meta, "outcome", "cut at max tokens");
      }
      if (outcome === "error" || outcome === "interrupted") {
        const err = document.createElement("div");
        err.className = "run-error";
        err.setAttribute("role", "alert");
        err.textContent = detail;
        wrap.append(err);
      }
      if (this.sessionKey === state.sessionKey) {
        updateComposer();
        scrollToEnd();
      }
      renderSessions();
    }
  }

  async function sendMessage() {
    const text = ui.input.value.trim();
    const images = state.attachments;
    const key = state.sessionKey;
    if ((!text && !images.length) || !key || state.liveRuns.has(key)) return;
    if (images.some((a) => !a.dataUrl)) {
      showAttachError("An image is still being read; send again in a moment.");
      return;
    }
    if (!state.ws) {
      showBanner("disconnected", "Not connected to the gateway; reconnecting…");
      return;
    }
    const agentId = state.sessionAgent || ui.agent.value;
    const run = new Run(key, agentId, text, images);
    state.liveRuns.set(key, run);
    const params = { message: text, agentId, sessionKey: key };
    if (images.length) params.images = images.map((a) => a.dataUrl);
    ui.input.value = "";
    clearAttachments();
    ui.messages.append(run.userNode.wrap, run.node.wrap);
    scrollToEnd();
    updateComposer();
    renderSessions();
    try {
      // No client-side timer: queueing may legitimately take up to the gateway's
      // queue timeout, and a run as long as the agent's; a dead socket ends it.
      const final = await request("agent", params,
        { onAccepted: (p) => run.onAccepted(p), timeout: 0 });
      run.finish("done", null, final.result);
    } catch (error) {
      if (error && error.code === "ABORTED") {
        run.finish("aborted", null, null);
      } else if (error && error.code === "DISCONNECTED") {
        run.finish("interrupted", errorText(error), null);
      } else {
        run.finish("error", errorText(error), null);
      }
    }
    refreshSessions();
  }

  // -- wiring ---------------------------------------------------------------

  ui.signinForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn(ui.secret.value);
  });
  ui.signOut.addEventListener("click", () => signOut(null));
  ui.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sendMessage();
  });
  ui.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      sendMessage();
    }
  });
  ui.stop.addEventListener("click", () => {
    const run = state.liveRuns.get(state.sessionKey);
    if (run) {
      ui.stop.disabled = true;
      run.abort();
    }
  });
  ui.attach.addEventListener("click", () => ui.attachInput.click());
  ui.attachInput.addEventListener("change", () => {
    addImages(Array.from(ui.attachInput.files));
    ui.attachInput.value = "";   // so that picking the same file again is a change
  });
  ui.input.addEventListener("paste", (ev) => {
    const files = ev.clipboardData ? Array.from(ev.clipboardData.files) : [];
    if (!files.length) return;
    // Text on the clipboard beside the file is pasted as usual.
    if (!ev.clipboardData.types.includes("text/plain")) ev.preventDefault();
    addImages(files);
  });
  ui.composer.addEventListener("dragover", (ev) => {
    if (!carriesFiles(ev)) return;
    ev.preventDefault();
    ev.dataTransfer.dropEffect = "copy";
    ui.composer.dataset.drop = "true";
  });
  ui.composer.addEventListener("dragleave", (ev) => {
    if (!ui.composer.contains(ev.relatedTarget)) delete ui.composer.dataset.drop;
  });
  ui.composer.addEventListener("drop", (ev) => {
    delete ui.composer.dataset.drop;
    if (!carriesFiles(ev)) return;
    ev.preventDefault();
    addImages(Array.from(ev.dataTransfer.files));
  });
  // A file dropped beside the composer must not replace the page.
  window.addEventListener("dragover", (ev) => { if (carriesFiles(ev)) ev.preventDefault(); });
  window.addEventListener("drop", (ev) => { if (carriesFiles(ev)) ev.preventDefault(); });
  ui.newSession.addEventListener("click", () => newSession());
  ui.refreshSessions.addEventListener("click", () => refreshSessions());
  ui.agent.addEventListener("change", () => {
    if (ui.agent.value !== state.sessionAgent) newSession();
  });
  window.addEventListener("online", () => {
    if (state.signedIn && !state.ws) {
      state.reconnectDelay = RECONNECT_MIN_MS;
      scheduleReconnect();
    }
  });

  const saved = sessionStorage.getItem(STORAGE_KEY);
  if (saved !== null) {
    signIn(saved, { automatic: true });
  } else {
    ui.secret.focus();
  }
})();
