"""The web chat page (``gateway.controlUi``, served at ``/``) in a real headless
Chromium driven by Playwright, against real gateway/worker processes and a fake
OpenAI upstream that streams slowly enough to watch.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``); Playwright
never downloads a browser. Without a Chromium binary these tests skip.

The agent's tool steps (SPEC §9) run against a second stack whose main agent has
a real MCP server over stdio (``tests/fakes/mcp_servers.py``) and a fake model
scripted to call its tools.

``CLAWBUS_SCREENSHOT=1`` also saves ``docs/screenshot.png`` (a finished reply) and
``docs/tool-steps.png`` (a session's history with its tool steps open).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from bus.messages import size_label
from tests.fakes.http_upstream import FakeReply, text_of
from tests.fakes.mcp_servers import stdio_command
from tests.fakes.openai_upstream import FakeOpenAI, RequestRecord, default_reply
from tests.helpers import TOKEN, Stack, base_config
from tests.procs import Gateway, write_config

pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    FilePayload,
    Locator,
    Page,
    WebSocketRoute,
    expect,
    sync_playwright,
)

pytestmark = pytest.mark.slow

PASSWORD = "web-pass-456"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "screenshot.png"
TOOL_SCREENSHOT = ROOT / "docs" / "tool-steps.png"

XSS_PROMPT = "xss please"
XSS_REPLY = ("<img src=x onerror=alert(1)> <script>window.__xss=1</script> **bold** "
             "[click](javascript:window.__xss=2)")
LONG_PROMPT = "long story"
LONG_WORDS = 80
MARKDOWN_PROMPT = "What does clawbus do with my message?"
MARKDOWN_REPLY = """Your message becomes an **agent run** on the bus:

1. the gateway publishes it to **NATS JetStream**, keyed by session;
2. any worker takes it and calls the model;
3. tokens stream back here as they arrive.

```bash
clawbus up --workers 2
```

Runs of one session never overlap, whichever gateway or worker serves them."""

SUM_PROMPT = "What is 2 + 3, and then 5 + 8?"
WAIT_PROMPT = "Wait a moment, then tell me."
BOOM_PROMPT = "Try the broken tool."
XSS_ARG = "<img src=x onerror=window.__xss=1>"
SUM_ARGS = [{"a": 2, "b": 3}, {"a": 5, "b": 8}]
WAIT_ARGS = {"seconds": 1.5}
BOOM_ARGS = {"why": XSS_ARG}
DANGER = "rgb(201, 55, 44)"  # app.css --danger

expect.set_options(timeout=15_000)


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CLAWBUS_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def reply(body: dict[str, Any]) -> str:
    last = ""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            last = text_of(message.get("content"))
            break
    if XSS_PROMPT in last:
        return XSS_REPLY
    if LONG_PROMPT in last:
        return " ".join(f"word{i}" for i in range(LONG_WORDS))
    if MARKDOWN_PROMPT in last:
        return MARKDOWN_REPLY
    return default_reply(body)


def tool_model(body: dict[str, Any]) -> str | FakeReply:
    """A model that calls the ``calc`` MCP server's tools, scripted by the question,
    and answers from their results."""
    messages = body.get("messages") or []
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    question = text_of(messages[last].get("content"))
    results = [text_of(m.get("content")) for m in messages[last:] if m.get("role") == "tool"]
    if SUM_PROMPT in question:
        if not results:
            return FakeReply("Let me add those.", [("calc__add", json.dumps(SUM_ARGS[0]))])
        if len(results) == 1:
            return FakeReply("", [("calc__add", json.dumps(SUM_ARGS[1]))])
        return f"2 + 3 = {results[0]}, and 5 + 8 = {results[1]}."
    if WAIT_PROMPT in question:
        if not results:
            return FakeReply("Waiting as asked.", [("calc__slow", json.dumps(WAIT_ARGS))])
        return f"The wait is over: {results[0]}."
    if BOOM_PROMPT in question:
        if not results:
            return FakeReply("", [("calc__boom", json.dumps(BOOM_ARGS))])
        return "That tool is broken today, so I have no answer for you."
    return default_reply(body)


def with_tag(records: list[RequestRecord], tag: str) -> list[RequestRecord]:
    return [r for r in records if r.path == "/v1/chat/completions" and tag in str(r.body)]


def png(tag: str) -> bytes:
    """A real 2×2 PNG (the page can show it), made unique by ``tag`` in a tEXt chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    rows = b"".join(b"\x00" + b"\x2f\x6f\xec\xff" * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 6, 0, 0, 0))
            + chunk(b"tEXt", b"Comment\x00" + tag.encode()) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def png_file(name: str, blob: bytes) -> FilePayload:
    """A file for Playwright's ``set_input_files`` / ``set_files``."""
    return {"name": name, "mimeType": "image/png", "buffer": blob}


def upstream_images(records: list[RequestRecord], blob: bytes) -> list[bytes]:
    """The images of the one upstream request that carried ``blob``, in order."""
    (record,) = with_tag(records, b64(blob))
    content = record.body["messages"][-1]["content"]
    return [base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
            for p in content if p.get("type") == "image_url"]


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary (apt-get install chromium; .ci/run does it as root)")
    return path


@pytest.fixture(scope="module")
def web_upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(reply=reply) as up:
        yield up


@pytest.fixture(scope="module")
def web_stack(web_upstream: FakeOpenAI,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One token-auth gateway with the page, one worker; extra gateways on the same
    bus: password auth with the HTTP endpoint off, and one with the page off."""
    directory = tmp_path_factory.mktemp("webui")
    config = base_config(web_upstream, queueTimeoutSeconds=2)
    config["gateway"]["controlUi"] = {"enabled": True}
    st = Stack.start(directory, web_upstream, config)
    try:
        password = base_config(web_upstream, queueTimeoutSeconds=2)
        password["gateway"]["auth"] = {"password": PASSWORD}
        password["gateway"]["http"]["endpoints"]["chatCompletions"]["enabled"] = False
        no_ui = base_config(web_upstream, queueTimeoutSeconds=2)
        no_ui["gateway"]["controlUi"] = {"enabled": False}
        for name, cfg in (("password", password), ("no-ui", no_ui)):
            path = write_config(directory / f"{name}.json5", cfg)
            st.gateways.append(Gateway(path, st.nats.url, name=f"gateway-{name}"))
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="module")
def tools_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway with the page and a worker whose main agent has the ``calc``
    MCP server (stdio), on a model scripted by :func:`tool_model`."""
    with FakeOpenAI(reply=tool_model) as up:
        config = base_config(up)
        config["gateway"]["controlUi"] = {"enabled": True}
        config["agents"]["list"][0]["tools"] = {
            "mcpServers": {"calc": {"command": stdio_command(), "cwd": str(ROOT)}},
            "callTimeoutSeconds": 10}
        st = Stack.start(tmp_path_factory.mktemp("webui-tools"), up, config)
        try:
            yield st
        finally:
            st.stop()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class PageProblems:
    """JS exceptions, CSP violations and dialogs seen by one page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error" and ("Content Security Policy" in msg.text
                                    or "Refused to" in msg.text):
            self.errors.append(f"console: {msg.text}")

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


_problems: dict[int, PageProblems] = {}


@pytest.fixture
def page(browser: Browser, web_upstream: FakeOpenAI) -> Iterator[Page]:
    """A fresh browser context (so fresh sessionStorage) per test; fails the test
    on any JS exception, CSP violation or dialog."""
    web_upstream.token_delay = 0.0
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    problems = _problems[id(pg)] = PageProblems(pg)
    try:
        yield pg
    finally:
        context.close()
        del _problems[id(pg)]
    assert problems.errors == []
    assert problems.dialogs == []


def problems_of(page: Page) -> PageProblems:
    return _problems[id(page)]


def sign_in(page: Page, url: str, secret: str = TOKEN) -> None:
    page.goto(url + "/")
    page.fill("#secret", secret)
    page.click("#signin-button")
    expect(page.locator("#chat-view")).to_be_visible()
    expect(page.locator("#conn")).to_have_attribute("data-state", "online")


def send(page: Page, text: str) -> None:
    expect(page.locator("#send")).to_be_enabled()
    page.fill("#input", text)
    page.click("#send")


def last_reply(page: Page) -> Locator:
    return page.locator("#messages .msg.assistant").last


def wait_done(page: Page) -> Locator:
    reply_node = last_reply(page)
    expect(reply_node).to_have_attribute("data-state", "done")
    return reply_node


def steps(reply_node: Locator) -> Locator:
    """The tool steps of one reply."""
    return reply_node.locator(".body .tool-step")


def body_parts(reply_node: Locator) -> list[str]:
    """A reply's body in order: ``text:…`` per text segment, ``step:<tool>`` per step."""
    return list(reply_node.locator(".body").evaluate("""body => Array.from(body.children,
        (el) => el.classList.contains('tool-step')
            ? 'step:' + el.querySelector('.tool-name').textContent
            : 'text:' + el.textContent.trim())"""))


def assert_step(step: Locator, name: str, status: str, args: str, result: str) -> None:
    """A finished step: its summary, then (opened) its arguments and result."""
    expect(step.locator("summary .tool-name")).to_have_text(name)
    expect(step).to_have_attribute("data-status", status)
    expect(step.locator("summary .tool-status")).to_have_text(status)
    expect(step).to_have_attribute("aria-busy", "false")
    if step.get_attribute("open") is None:
        step.locator("summary").click()
    expect(step.locator(".tool-args pre")).to_have_text(args)
    assert step.locator(".tool-args pre").text_content() == args  # its line breaks too
    expect(step.locator(".tool-result pre")).to_contain_text(result)
    result_block = step.locator(".tool-result")
    if status == "error":
        expect(result_block).to_have_class(re.compile(r"\berror\b"))
        expect(result_block.locator(".tool-label")).to_have_text("Error")
        expect(result_block.locator("pre")).to_have_css("color", DANGER)
    else:
        expect(result_block).not_to_have_class(re.compile(r"\berror\b"))
        expect(result_block.locator(".tool-label")).to_have_text("Result")


def pretty(args: dict[str, Any]) -> str:
    """Arguments as the page shows them."""
    return json.dumps(args, indent=2)


def assert_sum_reply(reply_node: Locator) -> None:
    """The reply to SUM_PROMPT: text, two ``calc__add`` steps, text."""
    assert body_parts(reply_node) == ["text:Let me add those.", "step:calc__add",
                                      "step:calc__add", "text:2 + 3 = 5, and 5 + 8 = 13."]
    for step, args, result in zip(steps(reply_node).all(), SUM_ARGS, ["5", "13"], strict=True):
        assert_step(step, "calc__add", "done", pretty(args), result)


def thumbnails(page: Page) -> Locator:
    """The images waiting above the composer."""
    return page.locator("#attachments .attachment img")


def dispatch_files(page: Page, selector: str, kind: str, files: list[tuple[str, bytes]]) -> bool:
    """Fire a synthetic ``paste`` (ClipboardEvent) or ``dragover``/``drop`` (DragEvent)
    carrying ``files`` at ``selector``; whether the page took it (defaultPrevented)."""
    return bool(page.evaluate("""([selector, kind, files]) => {
        const data = new DataTransfer();
        for (const [name, b64] of files) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            data.items.add(new File([bytes], name, { type: "image/png" }));
        }
        const init = { bubbles: true, cancelable: true };
        const event = kind === "paste"
            ? new ClipboardEvent("paste", { ...init, clipboardData: data })
            : new DragEvent(kind, { ...init, dataTransfer: data });
        document.querySelector(selector).dispatchEvent(event);
        return event.defaultPrevented;
    }""", [selector, kind, [(name, b64(blob)) for name, blob in files]]))


# -- HTTP side -----------------------------------------------------------------


def test_page_and_assets_served_with_a_strict_csp(web_stack: Stack) -> None:
    url = web_stack.url
    index = httpx.get(url + "/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    policy = index.headers["content-security-policy"]
    for directive in CSP.split("; "):
        assert directive in policy.split("; ")
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert index.headers["x-content-type-options"] == "nosniff"
    assert index.headers["referrer-policy"] == "no-referrer"
    assert "<script>" not in index.text and " style=" not in index.text  # nothing inline
    for asset in ("app.js", "app.css", "marked.min.js", "purify.min.js",
                  "marked.LICENSE.txt", "purify.LICENSE.txt"):
        resp = httpx.get(f"{url}/static/{asset}")
        assert resp.status_code == 200, asset
    assert httpx.get(f"{url}/static/app.js").headers["content-type"].startswith(
        ("text/javascript", "application/javascript"))
    assert httpx.get(f"{url}/static/nope.js").status_code == 404
    assert httpx.get(f"{url}/static/%2e%2e/webui.py").status_code == 404


def test_switch_off_means_404_but_websocket_still_works(web_stack: Stack) -> None:
    no_ui = web_stack.gateways[2].url
    assert httpx.get(no_ui + "/").status_code == 404
    assert httpx.get(no_ui + "/static/app.js").status_code == 404
    with ws_connect(no_ui.replace("http://", "ws://") + "/") as ws:
        assert '"connect.challenge"' in str(ws.recv(timeout=10))
        ws.send(json.dumps({"type": "req", "id": "1", "method": "connect",
                            "params": {"minProtocol": 3, "maxProtocol": 3,
                                       "auth": {"token": TOKEN}}}))
        assert '"hello-ok"' in str(ws.recv(timeout=10))


# -- in the browser ------------------------------------------------------------


def test_wrong_token_is_rejected(web_stack: Stack, page: Page) -> None:
    page.goto(web_stack.url + "/")
    page.fill("#secret", "not-the-token")
    page.click("#signin-button")
    expect(page.locator("#auth-error")).to_have_text("Wrong token or password.")
    expect(page.locator("#chat-view")).to_be_hidden()
    expect(page.locator("#signin-view")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('clawbus.secret')") is None
    assert "not-the-token" not in page.url


def test_sign_in_and_watch_a_reply_stream(web_stack: Stack, page: Page) -> None:
    sign_in(page, web_stack.url)
    assert page.evaluate("sessionStorage.getItem('clawbus.secret')") == TOKEN
    assert TOKEN not in page.url
    # the agent picker comes from /v1/models; the default agent is preselected
    options = page.locator("#agent option")
    expect(options).to_have_count(2)
    assert [options.nth(i).get_attribute("value") for i in range(2)] == ["main", "beta"]
    expect(page.locator("#agent")).to_have_value("main")

    tag = uuid.uuid4().hex[:8]
    words = " ".join(f"w{i}" for i in range(24))
    web_stack.upstream.token_delay = 0.12
    send(page, f"stream {tag} {words}")
    expect(page.locator("#stop")).to_be_enabled()
    reply_node = last_reply(page)
    body = reply_node.locator(".body")
    # Two samples while the run is still streaming (its final res not yet in):
    # the text grows in place.
    handle = reply_node.element_handle()
    grown = ("([el, n]) => el.dataset.state === 'streaming'"
             " && el.querySelector('.body').textContent.length > n")
    sample = "el => [el.dataset.state, el.querySelector('.body').textContent.length]"
    page.wait_for_function(grown, arg=[handle, 0])
    first = page.evaluate(sample, handle)
    page.wait_for_function(grown, arg=[handle, first[1]])
    second = page.evaluate(sample, handle)
    assert first[0] == second[0] == "streaming" and second[1] > first[1] > 0

    wait_done(page)
    expected = f"echo: stream {tag} {words}"
    expect(body).to_have_text(expected)
    assert len(expected) > second[1]
    expect(reply_node.locator(".meta .ttft")).to_have_text(re.compile(r"^first token \d+ ms$"))
    expect(reply_node.locator(".meta .usage")).to_have_text(
        re.compile(r"^\d+ in · 27 out · \d+ tokens$"))
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    # the finished session shows up in the list, selected
    key = page.locator("#session-title").inner_text()
    assert key.startswith("agent:main:web:")
    expect(page.locator(f'#sessions .session[data-key="{key}"]')).to_have_attribute(
        "aria-current", "true")
    (record,) = with_tag(web_stack.upstream.requests, tag)
    assert record.body["stream"] is True

    # A Markdown reply in a new session: this is the screenshot in the README.
    page.click("#new-session")
    web_stack.upstream.token_delay = 0.03
    send(page, MARKDOWN_PROMPT)
    done = wait_done(page)
    expect(done.locator(".body ol li")).to_have_count(3)
    expect(done.locator(".body pre code")).to_have_text(
        re.compile(r"^clawbus up --workers 2\s*$"))
    expect(done.locator(".body strong").first).to_have_text("agent run")
    second_key = page.locator("#session-title").inner_text()
    for k in (key, second_key):
        expect(page.locator(f'#sessions .session[data-key="{k}"] .sub')).to_contain_text(
            "1 turn")
    if os.environ.get("CLAWBUS_SCREENSHOT") == "1":
        page.locator("#input").blur()
        page.screenshot(path=str(SCREENSHOT))


def test_stop_aborts_a_run_mid_stream(web_stack: Stack, page: Page) -> None:
    sign_in(page, web_stack.url)
    tag = uuid.uuid4().hex[:8]
    web_stack.upstream.token_delay = 0.1
    send(page, f"{LONG_PROMPT} {tag}")
    reply_node = last_reply(page)
    expect(reply_node).to_have_attribute("data-state", "streaming")
    expect(reply_node.locator(".body")).to_contain_text("word3")
    page.click("#stop")
    expect(reply_node).to_have_attribute("data-state", "aborted")
    expect(reply_node.locator(".meta .outcome")).to_have_text("stopped")
    web_stack.upstream.wait_for(lambda recs: any(r.disconnected for r in with_tag(recs, tag)),
                                timeout=5.0)
    stopped_at = reply_node.locator(".body").inner_text()
    assert f"word{LONG_WORDS - 1}" not in stopped_at
    time.sleep(0.5)  # well over the token delay: nothing more arrives
    assert reply_node.locator(".body").inner_text() == stopped_at
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_switching_sessions_shows_their_history(web_stack: Stack, page: Page) -> None:
    sign_in(page, web_stack.url)
    tag = uuid.uuid4().hex[:8]
    send(page, f"alpha {tag}")
    wait_done(page)
    key_a = page.locator("#session-title").inner_text()

    # A new session with the other agent: the agent picker starts it.
    page.select_option("#agent", "beta")
    key_b = page.locator("#session-title").inner_text()
    assert key_b != key_a and key_b.startswith("agent:beta:web:")
    expect(page.locator("#messages .msg")).to_have_count(0)
    send(page, f"bravo {tag}")
    wait_done(page)
    page.click("#new-session")
    expect(page.locator("#messages .msg")).to_have_count(0)
    (bravo,) = with_tag(web_stack.upstream.requests, f"bravo {tag}")
    assert bravo.body["messages"][0]["content"] == "You are beta."

    page.click(f'#sessions .session[data-key="{key_a}"]')
    expect(page.locator("#session-title")).to_have_text(key_a)
    messages = page.locator("#messages .msg")
    expect(messages).to_have_count(2)
    expect(messages.nth(0)).to_have_text(re.compile(f"alpha {tag}"))
    expect(messages.nth(1).locator(".body")).to_have_text(f"echo: alpha {tag}")
    expect(messages.nth(1)).to_have_attribute("data-state", "history")
    expect(messages.nth(1).locator(".meta .usage")).to_contain_text("tokens")
    expect(page.locator("#agent")).to_have_value("main")

    page.click(f'#sessions .session[data-key="{key_b}"]')
    expect(page.locator("#session-title")).to_have_text(key_b)
    expect(messages).to_have_count(2)
    expect(messages.nth(1).locator(".body")).to_have_text(f"echo: bravo {tag}")
    expect(page.locator("#agent")).to_have_value("beta")

    # A second turn in A sees A's history upstream.
    page.click(f'#sessions .session[data-key="{key_a}"]')
    expect(messages).to_have_count(2)
    send(page, f"again {tag}")
    wait_done(page)
    expect(messages).to_have_count(4)
    (again,) = with_tag(web_stack.upstream.requests, f"again {tag}")
    assert [m["content"] for m in again.body["messages"][1:]] == [
        f"alpha {tag}", f"echo: alpha {tag}", f"again {tag}"]


def test_an_xss_payload_in_a_reply_is_inert(web_stack: Stack, page: Page) -> None:
    sign_in(page, web_stack.url)
    web_stack.upstream.token_delay = 0.02
    send(page, XSS_PROMPT)
    reply_node = wait_done(page)
    body = reply_node.locator(".body")
    # raw HTML is shown as text; Markdown still renders
    expect(body).to_contain_text("<img src=x onerror=alert(1)>")
    expect(body).to_contain_text("<script>window.__xss=1</script>")
    expect(body.locator("strong")).to_have_text("bold")
    link = body.locator("a")
    expect(link).to_have_text("click")
    assert not (link.get_attribute("href") or "").lower().startswith("javascript:")
    link.click()  # even clicked, nothing runs

    def assert_inert() -> None:
        assert page.locator("#messages img, #messages script, #messages [onerror]").count() == 0
        page.wait_for_timeout(300)  # time for an onerror/onload to fire, if one existed
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert problems_of(page).dialogs == []

    assert_inert()
    # Reloaded from the session's history: still inert.
    key = page.locator("#session-title").inner_text()
    page.click("#new-session")
    page.click(f'#sessions .session[data-key="{key}"]')
    expect(page.locator("#messages .msg.assistant .body strong")).to_have_text("bold")
    assert_inert()


def test_password_auth_with_the_http_endpoint_off(web_stack: Stack, page: Page) -> None:
    """/v1/models is 404 there: the agent list falls back to `agents.list`."""
    url = web_stack.gateways[1].url
    assert httpx.get(url + "/v1/models").status_code == 404
    page.goto(url + "/")
    page.fill("#secret", TOKEN)  # the other gateway's token is not this one's password
    page.click("#signin-button")
    expect(page.locator("#auth-error")).to_have_text("Wrong token or password.")
    sign_in(page, url, PASSWORD)
    options = page.locator("#agent option")
    expect(options).to_have_count(2)
    expect(page.locator("#agent")).to_have_value("main")
    send(page, "over the password door")
    expect(wait_done(page).locator(".body")).to_have_text("echo: over the password door")
    # a reload signs in again from sessionStorage, without the form
    page.reload()
    expect(page.locator("#chat-view")).to_be_visible()
    expect(page.locator("#signin-view")).to_be_hidden()


def test_a_dropped_connection_reconnects(web_stack: Stack, page: Page) -> None:
    sockets: list[WebSocketRoute] = []

    def through(ws: WebSocketRoute) -> None:
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r"^ws://[^/]+/$"), through)
    sign_in(page, web_stack.url)
    tag = uuid.uuid4().hex[:8]
    web_stack.upstream.token_delay = 0.1
    send(page, f"{LONG_PROMPT} {tag}")
    reply_node = last_reply(page)
    expect(reply_node).to_have_attribute("data-state", "streaming")
    sockets[-1].close(code=4000, reason="simulated network drop")
    expect(reply_node).to_have_attribute("data-state", "interrupted")
    expect(reply_node.locator(".run-error")).to_contain_text("connection dropped")
    banner = page.locator("#banner")
    expect(banner).to_have_attribute("data-kind", "disconnected")
    expect(banner).to_contain_text("Connection to the gateway lost")
    # The server side closed too, which cancelled the run upstream.
    web_stack.upstream.wait_for(lambda recs: any(r.disconnected for r in with_tag(recs, tag)),
                                timeout=5.0)
    # ... and the page reconnects by itself.
    expect(banner).to_have_attribute("data-kind", "reconnected")
    expect(page.locator("#conn")).to_have_attribute("data-state", "online")
    assert len(sockets) == 2
    web_stack.upstream.token_delay = 0.0
    send(page, f"after the drop {tag}")
    expect(wait_done(page).locator(".body")).to_have_text(f"echo: after the drop {tag}")


def test_attach_an_image_and_send_it(web_stack: Stack, page: Page) -> None:
    sign_in(page, web_stack.url)
    tag = uuid.uuid4().hex[:8]
    image = png(tag)
    with page.expect_file_chooser() as chooser:  # the button opens the picker
        page.click("#attach")
    chooser.value.set_files(files=[png_file("dot.png", image)])
    expect(thumbnails(page)).to_have_count(1)
    expect(thumbnails(page)).to_have_attribute("alt", "dot.png")
    expect(page.locator("#attachments .remove")).to_have_attribute("aria-label", "Remove dot.png")
    send(page, f"what is this {tag}")
    expect(wait_done(page).locator(".body")).to_have_text(f"echo: what is this {tag}")
    # The model got exactly the file's bytes.
    assert upstream_images(web_stack.upstream.requests, image) == [image]
    # The user's bubble shows the image (a data: URL the page made), the composer
    # is empty again.
    shown = page.locator("#messages .msg.user").last.locator("img")
    expect(shown).to_have_count(1)
    assert shown.get_attribute("src") == f"data:image/png;base64,{b64(image)}"
    assert shown.evaluate("img => img.complete && img.naturalWidth") == 2  # it renders
    expect(thumbnails(page)).to_have_count(0)
    expect(page.locator("#attachments")).to_be_hidden()
    # After a reload, the session's history shows the transcript's placeholder.
    key = page.locator("#session-title").inner_text()
    page.reload()
    expect(page.locator("#conn")).to_have_attribute("data-state", "online")
    page.click(f'#sessions .session[data-key="{key}"]')
    user = page.locator("#messages .msg.user .body")
    expect(user).to_have_text(re.compile(
        rf"^what is this {tag}\s+\[image: image/png, {size_label(len(image))}\]$"))
    expect(page.locator("#messages img")).to_have_count(0)


def test_paste_and_drop_images_then_send_them_alone(web_stack: Stack, page: Page) -> None:
    sign_in(page, web_stack.url)
    tag = uuid.uuid4().hex[:8]
    pasted, dropped = png(f"pasted {tag}"), png(f"dropped {tag}")
    page.focus("#input")
    assert dispatch_files(page, "#input", "paste", [("", pasted)])
    expect(thumbnails(page)).to_have_count(1)
    expect(page.locator("#input")).to_have_value("")  # nothing pasted as text
    assert dispatch_files(page, "#composer", "dragover", [("dropped.png", dropped)])
    expect(page.locator("#composer")).to_have_attribute("data-drop", "true")
    assert dispatch_files(page, "#composer", "drop", [("dropped.png", dropped)])
    expect(thumbnails(page)).to_have_count(2)
    assert thumbnails(page).evaluate_all("imgs => imgs.map((i) => i.alt)") == [
        "pasted image", "dropped.png"]
    expect(page.locator("#composer")).not_to_have_attribute("data-drop", "true")
    send(page, "")  # images alone, no text
    wait_done(page)
    assert upstream_images(web_stack.upstream.requests, pasted) == [pasted, dropped]
    bubble = page.locator("#messages .msg.user").last
    expect(bubble.locator("img")).to_have_count(2)
    expect(bubble.locator(".body")).to_have_text("")


def test_images_the_page_refuses(web_stack: Stack, page: Page) -> None:
    """Non-images, files over 10 MB, over 11 MB in all (a WebSocket frame holds
    16 MiB) and a ninth image are refused with a message; a removed image is not sent."""
    sign_in(page, web_stack.url)
    tag = uuid.uuid4().hex[:8]
    mb = 1024 * 1024
    keep = png(tag)
    text: FilePayload = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}
    page.set_input_files("#attach-input", files=[
        text,
        png_file("huge.png", png("huge") + bytes(10 * mb)),
        png_file("six.png", png("six") + bytes(6 * mb)),
        png_file("six-again.png", png("six-again") + bytes(6 * mb)),
        png_file("keep.png", keep),
    ])
    error = page.locator("#attach-error")
    expect(error).to_have_text("notes.txt is not an image. huge.png is larger than 10 MB. "
                               "six-again.png: at most 11 MB of images per message.")
    expect(error).to_have_attribute("role", "alert")
    expect(thumbnails(page)).to_have_count(2)
    page.click('#attachments .remove[aria-label="Remove six.png"]')
    expect(thumbnails(page)).to_have_count(1)
    expect(page.locator('#attachments .remove[aria-label="Remove keep.png"]')).to_be_focused()
    page.set_input_files("#attach-input", files=[
        png_file(f"{i}.png", png(f"{tag} {i}")) for i in range(8)])
    expect(error).to_have_text("7.png: at most 8 images per message.")
    expect(thumbnails(page)).to_have_count(8)
    for i in range(1, 7):
        page.click(f'#attachments .remove[aria-label="Remove {i}.png"]')
    expect(thumbnails(page)).to_have_count(2)
    send(page, f"two of them {tag}")
    wait_done(page)
    assert upstream_images(web_stack.upstream.requests, keep) == [keep, png(f"{tag} 0")]
    expect(error).to_be_hidden()


def test_tool_steps_show_live_between_the_text(tools_stack: Stack, page: Page) -> None:
    tools_stack.upstream.token_delay = 0.02
    sign_in(page, tools_stack.url)
    send(page, WAIT_PROMPT)
    reply_node = last_reply(page)
    # While the tool runs: its step, below the text that came before it.
    step = steps(reply_node).first
    expect(step).to_have_attribute("data-status", "running")
    expect(step).to_have_attribute("aria-busy", "true")
    expect(step.locator("summary .tool-status")).to_have_text("running…")
    expect(reply_node).to_have_attribute("data-state", "streaming")
    assert body_parts(reply_node) == ["text:Waiting as asked.", "step:calc__slow"]
    assert step.get_attribute("open") is None  # collapsed until asked
    step.locator("summary").click()
    expect(step.locator(".tool-args pre")).to_have_text(pretty(WAIT_ARGS))
    expect(step.locator(".tool-result")).to_have_count(0)
    # Then its result, and the text after it below it.
    wait_done(page)
    assert_step(step, "calc__slow", "done", pretty(WAIT_ARGS), "done")
    assert body_parts(reply_node) == ["text:Waiting as asked.", "step:calc__slow",
                                      "text:The wait is over: done."]

    send(page, SUM_PROMPT)
    reply_node = wait_done(page)
    assert_sum_reply(reply_node)
    expect(reply_node.locator(".meta .usage")).to_contain_text("tokens")


def test_stop_during_a_tool_step(tools_stack: Stack, page: Page) -> None:
    sign_in(page, tools_stack.url)
    send(page, WAIT_PROMPT)
    reply_node = last_reply(page)
    step = steps(reply_node).first
    expect(step).to_have_attribute("data-status", "running")
    page.click("#stop")
    expect(reply_node).to_have_attribute("data-state", "aborted")
    # No result will come: the step says so instead of spinning on.
    expect(step).to_have_attribute("data-status", "stopped")
    expect(step.locator("summary .tool-status")).to_have_text("no result")
    expect(step).to_have_attribute("aria-busy", "false")
    assert body_parts(reply_node) == ["text:Waiting as asked.", "step:calc__slow"]


def test_a_failing_tool_is_an_error_step_and_inert(tools_stack: Stack, page: Page) -> None:
    sign_in(page, tools_stack.url)
    send(page, BOOM_PROMPT)
    reply_node = wait_done(page)
    (step,) = steps(reply_node).all()
    assert_step(step, "calc__boom", "error", pretty(BOOM_ARGS), "boom went the tool")
    expect(step).to_have_css("border-top-color", DANGER)
    expect(step.locator(".tool-args pre")).to_contain_text(XSS_ARG)  # as text
    page.wait_for_timeout(300)  # time for an onerror to fire, if one existed
    assert page.locator("#messages img, #messages [onerror]").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_history_shows_the_tool_steps(tools_stack: Stack, page: Page) -> None:
    """After a reload, a session's stored turns show the same steps."""
    sign_in(page, tools_stack.url)
    send(page, SUM_PROMPT)
    wait_done(page)
    send(page, BOOM_PROMPT)
    wait_done(page)
    key = page.locator("#session-title").inner_text()
    page.reload()
    expect(page.locator("#conn")).to_have_attribute("data-state", "online")
    page.click(f'#sessions .session[data-key="{key}"]')
    messages = page.locator("#messages .msg")
    expect(messages).to_have_count(4)
    assert [m.get_attribute("data-role") for m in messages.all()] == [
        "user", "assistant", "user", "assistant"]
    total, boom = messages.nth(1), messages.nth(3)
    for node in (total, boom):
        expect(node).to_have_attribute("data-state", "history")
        expect(node.locator(".meta .usage")).to_have_count(1)
    assert_sum_reply(total)
    assert body_parts(boom)[0] == "step:calc__boom"
    assert_step(steps(boom).first, "calc__boom", "error", pretty(BOOM_ARGS), "boom went the tool")
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    if os.environ.get("CLAWBUS_SCREENSHOT") == "1":  # one step open, the others closed
        for step in [*steps(total).all()[1:], *steps(boom).all()]:
            step.locator("summary").click()
        page.locator("#input").blur()
        page.set_viewport_size({"width": 1280, "height": 900})
        page.evaluate("document.getElementById('messages').scrollTop = 1e9")
        page.screenshot(path=str(TOOL_SCREENSHOT))


def test_no_worker_available_is_explained(web_stack: Stack, page: Page) -> None:
    """Last in this module: it stops the stack's only worker."""
    sign_in(page, web_stack.url)
    for worker in web_stack.workers:
        worker.stop()
    send(page, "anyone there?")
    reply_node = last_reply(page)
    expect(reply_node).to_have_attribute("data-state", "error")
    expect(reply_node.locator(".run-error")).to_have_text(
        re.compile(r"^No agent worker available\."))
    expect(page.locator("#send")).to_be_enabled()
