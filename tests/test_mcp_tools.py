"""The workers' MCP client layer (SPEC §9): :class:`workers.mcp.AgentTools`
against real MCP servers written with the official SDK (tests/fakes/mcp_servers.py),
one a stdio child process, one on streamable HTTP on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import mcp.types as mcp
import pytest

from clawbus.config import Settings, parse_settings
from tests.fakes.mcp_servers import HttpMcpServer, children_of, stdio_command
from workers.mcp import AgentTools, ToolOutcome
from workers.mcp import server as mcp_server
from workers.mcp.names import MAX_NAME, allowed, model_names
from workers.mcp.outcome import cut, result_text
from workers.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 10.0
BOTH_LOOPS = True  # workers run on uvloop: its child watcher reaps differently
TOOLS = ["add", "echo_env", "slow", "boom", "crash", "exit_soon", "meta", "picture", "pid",
         "add_tool"]


@pytest.fixture(scope="module")
def http_server() -> Iterator[HttpMcpServer]:
    with HttpMcpServer() as server:
        yield server


def stdio(**env: str) -> dict[str, Any]:
    return {"command": stdio_command(), "cwd": str(REPO), "env": env}


def settings(servers: dict[str, Any], **tools: Any) -> Settings:
    """One agent, ``main``, with these MCP servers; a second, ``plain``, without tools."""
    return parse_settings({"agents": {"list": [
        {"id": "main", "default": True, "tools": {"mcpServers": servers, **tools}},
        {"id": "plain"},
    ]}}, env={})


async def call(tools: AgentTools, name: str, arguments: dict[str, Any] | str | None = None,
               *, call_id: str = "call-1") -> ToolOutcome:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    return await tools.call("main", name, text, run_id="run-1", call_id=call_id)


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before() -> None:
    """Children this process already had (a session's shared nats-server, …):
    not the test's."""
    _BEFORE.clear()
    _BEFORE.update(children_of(os.getpid()))


def children() -> dict[int, str]:
    """This process's children started during the test (stdio servers)."""
    return {pid: state for pid, state in children_of(os.getpid()).items()
            if pid not in _BEFORE}


@contextlib.asynccontextmanager
async def opened(config: Settings, env: Mapping[str, str] | None = None,
                 ) -> AsyncIterator[tuple[AgentTools, WorkerMetrics]]:
    """An :class:`AgentTools` for ``config``, with its metrics, closed after use."""
    metrics = WorkerMetrics()
    tools = AgentTools(config, env or {}, metrics)
    try:
        yield tools, metrics
    finally:
        await tools.aclose()


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for something another process does in its own time (bounded)."""
    deadline = time.monotonic() + DEADLINE
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def count(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- names


def test_names_are_server_prefixed() -> None:
    assert model_names([("files", "read"), ("search", "query")]) == \
        ["files__read", "search__query"]


def test_names_are_cut_to_64_and_unique() -> None:
    long = "t" * 80
    names = model_names([("srv", long), ("srv", long + "x"), ("srv", "a.b"), ("srv", "a_b")])
    assert all(len(n) <= MAX_NAME for n in names)
    assert names[0] == ("srv__" + long)[:MAX_NAME]
    assert len(set(names)) == 4
    assert names[1].startswith("srv__ttt") and names[1].endswith("_2")
    # a name that needs no rewriting keeps itself; the rewritten one moves aside
    assert names[3] == "srv__a_b"
    assert names[2] == "srv__a_b_2"


def test_allow_and_deny_globs() -> None:
    assert allowed("files__read", None, ())
    assert allowed("files__read", ["files__*"], ())
    assert not allowed("search__query", ["files__*"], ())
    assert not allowed("files__delete", ["files__*"], ["files__delete"])  # deny wins
    assert not allowed("files__read", None, ["*"])
    assert not allowed("Files__read", ["files__*"], ())  # case-sensitive


# --------------------------------------------------------------------------- result text


def test_result_text_joins_parts_and_describes_the_rest() -> None:
    result = mcp.CallToolResult(content=[
        mcp.TextContent(type="text", text="one"),
        mcp.ImageContent(type="image", data="AAAA", mime_type="image/png"),
        mcp.TextContent(type="text", text="two")])
    assert result_text(result) == "one\n[image: image/png]\ntwo"


def test_result_text_structured_only() -> None:
    result = mcp.CallToolResult(content=[], structured_content={"sum": 3})
    assert result_text(result) == '{"sum":3}'


def test_result_text_error_without_text() -> None:
    assert result_text(mcp.CallToolResult(content=[], is_error=True)) == \
        "the tool reported an error"


def test_cut_marks_what_was_left_out() -> None:
    assert cut("x" * 100, 100) == "x" * 100
    assert cut("x" * 130, 100) == "x" * 100 + "… [cut: 30 more characters]"


# --------------------------------------------------------------------------- config


def test_limits_merge_defaults_and_agent() -> None:
    config = parse_settings({"agents": {
        "defaults": {"tools": {"maxRounds": 3, "callTimeoutSeconds": 5}},
        "list": [{"id": "a", "tools": {"resultMaxChars": 500}}, {"id": "b"}]}}, env={})
    tools = AgentTools(config, {})
    assert (tools.limits("a").max_rounds, tools.limits("a").call_timeout_seconds,
            tools.limits("a").result_max_chars) == (3, 5.0, 500)
    assert tools.limits("b").result_max_chars == 16_000
    assert tools.limits("unknown").max_rounds == 3


async def test_agent_without_tools_has_none() -> None:
    async with opened(settings({"fs": stdio()})) as (tools, _):
        assert await tools.tools_for("plain") == ()
        assert not tools.owns("plain", "fs__add")
        assert children() == {}  # nothing was started for it


# --------------------------------------------------------------------------- listing


async def test_tools_as_the_model_sees_them() -> None:
    async with opened(settings({"fs": stdio()})) as (tools, _):
        await tools.start()
        specs = await tools.tools_for("main")
        assert [s.name for s in specs] == [f"fs__{t}" for t in TOOLS]
        add = specs[0]
        assert add.description == "Add two integers.\nReturns their sum."
        assert add.parameters is not None
        assert add.parameters["properties"].keys() == {"a", "b"}
        assert add.parameters["required"] == ["a", "b"]
        assert tools.owns("main", "fs__add")
        assert not tools.owns("main", "add")
        assert not tools.owns("main", "get_weather")  # a client tool
        assert await tools.tools_for("main") is specs  # cached


async def test_allow_and_deny_filter_the_offer() -> None:
    config = settings({"fs": stdio()}, allow=["fs__a*", "fs__echo_env"], deny=["fs__add_tool"])
    async with opened(config) as (tools, _):
        names = [s.name for s in await tools.tools_for("main")]
        assert names == ["fs__add", "fs__echo_env"]
        assert not tools.owns("main", "fs__add_tool")
        outcome = await call(tools, "fs__add_tool", {"name": "x"})
        assert outcome.is_error and "unknown tool" in outcome.text


async def test_agents_share_a_server_and_same_name_other_config_is_another() -> None:
    config = parse_settings({"agents": {
        "defaults": {"tools": {"mcpServers": {"fs": stdio()}}},
        "list": [{"id": "a"}, {"id": "b"},
                 {"id": "c", "tools": {"mcpServers": {"fs": stdio(FLAVOUR="c")}}}]}}, env={})
    async with opened(config) as (tools, _):
        await tools.start()
        assert len(children()) == 2
        pids = {}
        for agent in ("a", "b", "c"):
            outcome = await tools.call(agent, "fs__pid", "{}", run_id="r", call_id="c")
            pids[agent] = outcome.text
        assert pids["a"] == pids["b"] != pids["c"]


# --------------------------------------------------------------------------- calls


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_call_and_its_meta(transport: str, http_server: HttpMcpServer) -> None:
    server = stdio() if transport == "stdio" else {"url": http_server.url}
    async with opened(settings({"srv": server})) as (tools, metrics):
        outcome = await call(tools, "srv__add", {"a": 2, "b": 40})
        assert outcome == ToolOutcome("42", False, outcome.seconds)
        assert 0 < outcome.seconds < DEADLINE
        meta = await call(tools, "srv__meta", call_id="call-7")
        assert json.loads(meta.text) == {"clawbus/runId": "run-1", "clawbus/toolCallId": "call-7"}
        assert count(metrics, "clawbus_worker_tool_calls_total", server="srv", tool="add",
                     outcome="ok") == 1
        assert count(metrics, "clawbus_worker_tool_call_seconds_count", server="srv") == 2


async def test_http_headers_reach_the_server(http_server: HttpMcpServer) -> None:
    web = {"url": http_server.url, "headers": {"X-Clawbus-Test": "yes"}}
    async with opened(settings({"web": web})) as (tools, _):
        assert (await call(tools, "web__add", {"a": 1, "b": 1})).text == "2"
        assert http_server.seen_headers.get("x-clawbus-test") == "yes"


async def test_bad_arguments_make_no_call() -> None:
    async with opened(settings({"fs": stdio()})) as (tools, metrics):
        await tools.start()
        bad = await call(tools, "fs__add", "{not json")
        assert bad.is_error and "not valid JSON" in bad.text
        array = await call(tools, "fs__add", "[1, 2]")
        assert array.is_error and "must be a JSON object, not an array" in array.text
        assert count(metrics, "clawbus_worker_tool_calls_total", server="fs", tool="add",
                     outcome="error") == 2
        invalid = await call(tools, "fs__add", {"a": "x"})  # the server's own check
        assert invalid.is_error


async def test_a_raising_tool_is_an_error_result() -> None:
    async with opened(settings({"fs": stdio()})) as (tools, _):
        outcome = await call(tools, "fs__boom")
        assert outcome.is_error
        assert "boom went the tool" in outcome.text
        assert (await call(tools, "fs__add", {"a": 1, "b": 2})).text == "3"  # still up


async def test_images_are_described_and_results_cut() -> None:
    async with opened(settings({"fs": stdio(BIG="y" * 500)}, resultMaxChars=100)) as (tools, _):
        assert (await call(tools, "fs__picture")).text == "a red dot\n[image: image/png]"
        big = await call(tools, "fs__echo_env", {"name": "BIG"})
        assert big.text == "y" * 100 + "… [cut: 400 more characters]"


async def _reads(path: Path, text: str) -> bool:
    file = anyio.Path(path)
    return await file.exists() and await file.read_text() == text


async def test_a_hanging_tool_times_out_and_is_cancelled(tmp_path: Path) -> None:
    marker = tmp_path / "slow"
    async with opened(settings({"fs": stdio()}, callTimeoutSeconds=0.5)) as (tools, metrics):
        await tools.start()
        started = time.monotonic()
        outcome = await call(tools, "fs__slow", {"seconds": 30, "marker": str(marker)})
        assert outcome.is_error
        assert outcome.text == "tool call timed out after 0.5 s"
        assert 0.5 <= time.monotonic() - started < 1.5
        await until(lambda: _reads(marker, "cancelled"), "the server to see the cancellation")
        assert count(metrics, "clawbus_worker_tool_calls_total", server="fs", tool="slow",
                     outcome="timeout") == 1
        assert (await call(tools, "fs__add", {"a": 1, "b": 2})).text == "3"


async def test_caller_cancellation_cancels_the_call(tmp_path: Path) -> None:
    marker = tmp_path / "slow"
    async with opened(settings({"fs": stdio()})) as (tools, metrics):
        await tools.start()
        task = asyncio.create_task(call(tools, "fs__slow", {"seconds": 30,
                                                            "marker": str(marker)}))
        await until(lambda: _reads(marker, "started"), "the call to reach the server")
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0
        await until(lambda: _reads(marker, "cancelled"), "the server to see the cancellation")
        assert count(metrics, "clawbus_worker_tool_calls_total", server="fs", tool="slow",
                     outcome="cancelled") == 1


async def test_a_crash_mid_call_is_an_error_then_the_server_restarts() -> None:
    async with opened(settings({"fs": stdio()})) as (tools, metrics):
        first = int((await call(tools, "fs__pid")).text)
        outcome = await call(tools, "fs__crash")
        assert outcome.is_error
        assert "'fs'" in outcome.text and "connection ended during the call" in outcome.text
        second = int((await call(tools, "fs__pid")).text)
        assert second != first
        assert first not in children()  # exited and reaped: no zombie
        now = children()
        assert list(now) == [second]
        assert now[second] != "Z"
        assert count(metrics, "clawbus_worker_mcp_server_restarts_total", server="fs") == 1
        assert (await tools.tools_for("main"))[0].name == "fs__add"


async def test_a_server_that_exits_while_idle_is_reaped_and_restarted(
        caplog: pytest.LogCaptureFixture) -> None:
    async with opened(settings({"fs": stdio()})) as (tools, metrics):
        first = int((await call(tools, "fs__pid")).text)
        assert (await call(tools, "fs__exit_soon")).text == "bye"

        async def noticed() -> bool:
            return any("'fs' closed the connection" in r.getMessage() for r in caplog.records)

        await until(noticed, "the worker to notice the exit")
        outcome = await call(tools, "fs__pid")  # no error: a new server answers
        assert first not in children()  # reaped
        assert not outcome.is_error and int(outcome.text) != first
        assert count(metrics, "clawbus_worker_mcp_server_restarts_total", server="fs") == 1


async def test_the_child_gets_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCLAW_GATEWAY_TOKEN", "gateway-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider-secret")
    monkeypatch.setenv("CLAWBUS_CONFIG", "/somewhere/clawbus.json5")
    async with opened(settings({"fs": stdio(CONFIGURED="from-config")}), os.environ) as (tools, _):
        for name in ("OPENCLAW_GATEWAY_TOKEN", "OPENAI_API_KEY", "CLAWBUS_CONFIG"):
            assert (await call(tools, "fs__echo_env", {"name": name})).text == "", name
        assert (await call(tools, "fs__echo_env", {"name": "PATH"})).text == os.environ["PATH"]
        assert (await call(tools, "fs__echo_env", {"name": "CONFIGURED"})).text == \
            "from-config"


async def test_a_server_that_cannot_start(caplog: pytest.LogCaptureFixture) -> None:
    config = settings({"fs": stdio(), "bad": {"command": ["/nonexistent/mcp"]}})
    async with opened(config) as (tools, metrics):
        with caplog.at_level(logging.WARNING, "clawbus.mcp"):
            await tools.start()
        assert any("'bad'" in r.getMessage() and "/nonexistent/mcp" in r.getMessage()
                   for r in caplog.records)
        assert count(metrics, "clawbus_worker_mcp_server_failures_total", server="bad") == 1
        names = [s.name for s in await tools.tools_for("main")]
        assert names == [f"fs__{t}" for t in TOOLS]
        good, bad = tools.servers()
        assert (good.server, good.transport, good.tools, good.problem) == \
            ("fs", "stdio", len(TOOLS), None)
        assert (bad.server, bad.agents, bad.tools) == ("bad", ("main",), None)
        assert bad.problem == "cannot run '/nonexistent/mcp': No such file or directory"


async def test_an_unreachable_http_server_fails_to_start() -> None:
    async with opened(settings({"web": {"url": "http://127.0.0.1:9/mcp"}})) as (tools, _):
        await tools.start()
        assert await tools.tools_for("main") == ()
        [web] = tools.servers()
        assert (web.server, web.transport) == ("web", "http")
        assert web.problem is not None and "ConnectError" in web.problem
        outcome = await call(tools, "web__add", {"a": 1, "b": 2})
        assert outcome.is_error and "unknown tool" in outcome.text


async def test_tools_list_changed_refreshes_the_offer() -> None:
    async with opened(settings({"fs": stdio()})) as (tools, _):
        assert "fs__fresh" not in {s.name for s in await tools.tools_for("main")}
        assert (await call(tools, "fs__add_tool", {"name": "fresh"})).text == "added"

        async def offered() -> bool:
            return "fs__fresh" in {s.name for s in await tools.tools_for("main")}

        await until(offered, "the new tool to be offered")
        assert tools.owns("main", "fs__fresh")
        assert (await call(tools, "fs__fresh")).text == "I am fresh"


async def test_aclose_leaves_no_child_process() -> None:
    tools = AgentTools(settings({"one": stdio(), "two": stdio(N="2")}), {})
    await tools.start()
    assert len(children()) == 2
    await tools.aclose()
    assert children() == {}
    await tools.aclose()  # idempotent
    outcome = await call(tools, "one__add", {"a": 1, "b": 2})
    assert outcome.is_error and "shutting down" in outcome.text


async def test_a_failed_server_is_started_again_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcp_server, "RETRY_AFTER", (0.0,))
    script = tmp_path / "server.py"  # not there yet: the first start fails
    config = settings({"fs": {"command": [sys.executable, str(script)], "cwd": str(REPO)}})
    async with opened(config) as (tools, metrics):
        await tools.start()
        assert tools.servers()[0].problem is not None
        await anyio.Path(script).write_text(
            f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "from tests.fakes.mcp_servers import main\nmain(['', 'stdio'])\n")
        assert await tools.tools_for("main") == ()  # not waited for

        async def offered() -> bool:
            return len(await tools.tools_for("main")) == len(TOOLS)

        await until(offered, "the server's tools after its restart")
        assert tools.servers()[0].problem is None
        assert (await call(tools, "fs__add", {"a": 1, "b": 2})).text == "3"
        assert count(metrics, "clawbus_worker_mcp_server_failures_total", server="fs") == 1
