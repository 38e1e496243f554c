"""Smoke tests of the benchmark harness (bench/): the fake upstream answers with
OpenAI's shapes, the stream client parses its SSE, wrk's Lua script reports JSON,
and the report renders. No timing assertions: the benchmark itself is the judge."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import report, run, streamclient, upstream, wrk
from clawbus.natsserver import NatsServer
from tests.schemas import validate


@pytest.fixture
async def fake() -> AsyncIterator[int]:
    """The fake upstream on a free port in this test's loop; yields the port."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(upstream.serve("127.0.0.1", 0, 32, 0.0, ready))
    port = await asyncio.wait_for(ready, 5)
    try:
        yield port
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _exchange(port: int, body: dict[str, Any]) -> bytes:
    """One raw HTTP/1.1 request (Connection: close); the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body)
    writer.write(streamclient.build_request("127.0.0.1", port, "/v1/chat/completions",
                                            payload, None, keep_alive=False))
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        body = rest[size + 2:]


async def test_upstream_non_streaming_shape(fake: int) -> None:
    raw = await _exchange(fake, {"model": "fake-t5", "messages": [{"role": "user",
                                                                  "content": "hi"}]})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    completion = orjson.loads(body)
    validate("chat_completion", completion)
    assert completion["choices"][0]["message"]["content"].split() == [
        f"w{k}" for k in range(5)]
    assert completion["usage"]["completion_tokens"] == 5


async def test_upstream_streaming_shape(fake: int) -> None:
    raw = await _exchange(fake, {"model": "fake-t4-d1", "stream": True, "messages": []})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"text/event-stream" in head and b"chunked" in head.lower()
    events = [line[len(b"data: "):] for line in _dechunk(body).split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate("chat_completion_chunk", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.split() == ["w0", "w1", "w2", "w3"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_upstream_keep_alive_and_errors(fake: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fake)
    try:
        request = streamclient.build_request("127.0.0.1", fake, "/v1/chat/completions",
                                             b'{"model": "fake-t2"}', None)
        writer.write(request + request + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        seen = b""
        while seen.count(b"HTTP/1.1 ") < 3:
            seen += await asyncio.wait_for(reader.read(65536), 5)
        assert seen.count(b"HTTP/1.1 200 OK") == 2 and b"HTTP/1.1 404" in seen
    finally:
        writer.close()
        await writer.wait_closed()


async def test_streamclient_closed_loop_parses_sse(fake: int) -> None:
    request = streamclient.build_request(
        "127.0.0.1", fake, "/v1/chat/completions",
        b'{"model": "fake-t6-d2", "stream": true, "messages": []}', None)
    records, every = await streamclient.closed_loop("127.0.0.1", fake, request, concurrency=2,
                                                    duration=0.1, stream_timeout=5)
    assert records == every  # no warm-up: every stream is measured
    assert sum(r.first for r in every) == 2  # one first-wave stream per lane
    result = streamclient.summarize(records, tokens=6, delay_ms=2, slack_ms=10_000)
    assert result["streams"] >= 2
    assert result["ok"] == result["streams"] == result["on_time"]
    assert result["errors"] == {}
    assert result["ttft_ms"]["p50"] is not None


async def test_streamclient_closed_loop_warmup(fake: int) -> None:
    """Streams opened during the warm-up are left out of the measured ones, and the
    first wave (one stream per lane, opened together) is among the left-out ones."""
    request = streamclient.build_request(
        "127.0.0.1", fake, "/v1/chat/completions",
        b'{"model": "fake-t2-d5", "stream": true, "messages": []}', None)
    started = asyncio.get_running_loop().time()
    records, every = await streamclient.closed_loop(
        "127.0.0.1", fake, request, concurrency=3, duration=0.05, stream_timeout=5,
        warmup=0.2)
    # The warm-up was waited out (a lower bound: behaviour, never a speed claim).
    assert asyncio.get_running_loop().time() - started >= 0.25
    measured = {id(r) for r in records}
    warm = [r for r in every if id(r) not in measured]
    assert records and warm
    assert sum(r.first for r in warm) == 3 and not any(r.first for r in records)
    assert max(r.started for r in warm) < min(r.started for r in records)


async def test_streamclient_open_rate(fake: int) -> None:
    request = streamclient.build_request(
        "127.0.0.1", fake, "/v1/chat/completions",
        b'{"model": "fake-t3-d1", "stream": true, "messages": []}', None, keep_alive=False)
    records = await streamclient.open_rate("127.0.0.1", fake, request, streams=5, rate=200,
                                           stream_timeout=5)
    result = streamclient.summarize(records, tokens=3, delay_ms=1, slack_ms=10_000)
    assert result["streams"] == result["ok"] == 5


async def test_streamclient_reports_http_errors(fake: int) -> None:
    request = streamclient.build_request("127.0.0.1", fake, "/v1/nope", b"{}", None)
    records, _ = await streamclient.closed_loop("127.0.0.1", fake, request, concurrency=1,
                                                duration=0.01, stream_timeout=5)
    result = streamclient.summarize(records, tokens=1, delay_ms=0)
    assert result["ok"] == 0 and result["error_count"] == result["streams"] >= 1
    assert any("HTTP 404" in message for message in result["errors"])


def test_on_time_definition() -> None:
    """Token k is due at open + k × delay; later than the slack makes the stream late."""
    def record(*offsets: float) -> streamclient.StreamRecord:
        rec = streamclient.StreamRecord(intended=0.0, started=0.0, status=200, done=True,
                                        complete=True)
        rec.token_times = list(offsets)
        return rec

    on_time = record(0.01, 0.51, 1.02)
    late_start = record(0.2, 0.5, 1.0)
    fell_behind = record(0.0, 0.5, 1.15)
    short = record(0.0, 0.5)
    result = streamclient.summarize([on_time, late_start, fell_behind, short], tokens=3,
                                    delay_ms=500, slack_ms=100)
    assert result["on_time"] == 1 and result["ok"] == 3
    assert "incomplete: 2/3 tokens, done=True" in result["errors"]
    # The three misses, by the second they opened in, and one by one.
    assert result["late_by_second"] == {"0": 3}
    by_open = {(e["late_ms"], e["worst_token"]) for e in result["late_sample"]}
    assert by_open == {(200.0, 0), (150.0, 2), (0.0, 0)}


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
async def test_wrk_script_reports_json(fake: int) -> None:
    result = await asyncio.to_thread(
        wrk.run_wrk, shutil.which("wrk") or "wrk", f"http://127.0.0.1:{fake}/v1/chat/completions",
        b'{"model": "fake-t4"}', auth="x", connections=2, duration=1, cpus=None,
        max_requests=50)
    assert result["requests"] >= 50 and result["error_count"] == 0
    assert result["latency_us"]["p50"] > 0


def test_report_renders_and_updates_doc(tmp_path: Path) -> None:
    def rec(system: str, scenario: str, **values: Any) -> dict[str, Any]:
        return {"round": 1, "system": system, "scenario": scenario, **values}

    records = [rec(s, "rps_c16", rps=r, latency_us={"p50": 100.0}, error_count=0)
               for s, r in (("upstream", 40000.0), ("clawbus", 1500.0))]
    records.append(rec("clawbus", "idle_rss", rss_bytes=100 * 2**20, pss_bytes=None))
    raw = {"plan": {"duration": 1, "concurrency": [16], "ttft_concurrency": [], "held": [],
                    "held_rate": 250, "cpu_requests": 10, "scaling_workers": [],
                    "slack_ms": 100},
           "machine": {"cpu": "test"}, "cpus": {"system": "0", "harness": "1"},
           "started": "2025-01-01T00:00:00", "records": records}
    text = report.render(raw, "bench/results/x.json", "python -m bench.run")
    assert "| non-streaming req/s, c=16 | 40,000 | 1,500 | 115 | 13.0× |" in text
    doc = tmp_path / "BENCH.md"
    mention = "Use `<!-- bench:begin -->` … `<!-- bench:end -->` lines.\n"
    doc.write_text(f"# title\n{mention}\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\ntail\n")
    run.update_doc(doc, text)
    updated = doc.read_text()
    assert "old" not in updated and updated.startswith(f"# title\n{mention}")
    assert updated.endswith("<!-- bench:end -->\n\ntail\n") and "40,000" in updated
    bare = tmp_path / "NEW.md"
    run.update_doc(bare, text)
    assert bare.read_text().startswith("## Latest results\n\n<!-- bench:begin -->\n")


def test_report_stateful_rows() -> None:
    def rec(scenario: str, rps: float, **extra: Any) -> dict[str, Any]:
        return {"round": 1, "system": "clawbus", "scenario": scenario, "rps": rps,
                "latency_us": {"p50": 100.0}, "error_count": 0, **extra}

    raw = {"plan": {"duration": 1, "concurrency": [16], "ttft_concurrency": [], "held": [],
                    "held_rate": 250, "cpu_requests": 10, "slack_ms": 100, "sessions": 64},
           "machine": {"cpu": "test"}, "cpus": {"system": "0", "harness": "1"},
           "started": "2025-01-01T00:00:00",
           "records": [rec("rps_c16", 1500.0), rec("sessions_c16", 450.0,
                                                   cpu_ms_per_request=2.5)]}
    text = report.render(raw, "bench/results/x.json", "python -m bench.run")
    assert ("| non-streaming req/s, c=16, stateful: 64 sessions (lease, history, stored "
            "turn; clawbus only) |  | 450 (0.30× stateless) | — |  |") in text
    assert "| … its CPU per request (ms) |  | 2.50 | — |  |" in text


def test_report_ttft_rows_show_the_first_wave_apart() -> None:
    def rec(system: str, p50: float, wave: float) -> dict[str, Any]:
        return {"round": 1, "system": system, "scenario": "ttft_c64",
                "ttft_ms": {"p50": p50}, "gap_ms": {"p99": 21.0},
                "first_wave_ttft_ms": {"p50": wave}}

    raw = {"plan": {"duration": 5, "concurrency": [], "ttft_concurrency": [64], "held": [],
                    "held_rate": 250, "cpu_requests": 10, "slack_ms": 100,
                    "ttft_warmup": 5.0},
           "machine": {"cpu": "test"}, "cpus": {"system": "0", "harness": "1"},
           "started": "2025-01-01T00:00:00",
           "records": [rec("upstream", 1.5, 2.0), rec("clawbus", 7.5, 32.0)]}
    text = report.render(raw, "bench/results/x.json", "python -m bench.run")
    assert "| **added** TTFT p50, c=64 (ms) |  | +6.00 |" in text
    assert "first wave: 64 streams opened at once on new connections" in text
    assert "| added TTFT p50 at c=64 ≤ 10 ms | +6.00 ms (first wave, 64 opened at once: " \
           "+30.00 ms) | yes |" in text
    assert "after a 5-second warm-up" in text


@pytest.mark.parametrize(("rounds", "shown", "verdict"), [
    ((1.0, 1.0), "100%, 100% by round (worst stream 80 ms late; slack 100 ms)", "yes"),
    ((1.0, 0.993), "100%, 99.3% by round (worst stream 112 ms late; slack 100 ms)", "**no**"),
    ((0.9996, 1.0), "99.9%, 100% by round (worst stream 112 ms late; slack 100 ms)", "**no**"),
])
def test_report_held_target_needs_every_round_on_time(
        rounds: tuple[float, float], shown: str, verdict: str) -> None:
    records = [{"round": i + 1, "system": "clawbus", "scenario": "held_2000",
                "on_time_fraction": frac, "ttft_ms": {"p99": 30.0},
                "lateness_ms": {"max": 80.0 if frac >= 1.0 else 112.0}}
               for i, frac in enumerate(rounds)]
    raw = {"plan": {"duration": 5, "concurrency": [], "ttft_concurrency": [], "held": [2000],
                    "held_rate": 250, "cpu_requests": 10, "slack_ms": 100},
           "machine": {"cpu": "test"}, "cpus": {"system": "0", "harness": "1"},
           "started": "2025-01-01T00:00:00", "records": records}
    text = report.render(raw, "bench/results/x.json", "python -m bench.run")
    assert f"| 2,000 concurrent streams (20 × 500 ms) on time | {shown} | {verdict} |" in text


def test_profile_top_frames_counts_self_and_inclusive_samples() -> None:
    from bench.profile import top_frames

    raw = "main;serve;parse 3\nmain;serve;write 5\nmain;idle 2\nnot a stack line\n"
    total, own, inclusive = top_frames(raw, 10)
    assert total == 10
    assert own[0] == ("write", 5) and ("parse", 3) in own and ("idle", 2) in own
    assert dict(inclusive)["main"] == 10 and dict(inclusive)["serve"] == 8


async def test_history_bench_renders(nats_server: NatsServer) -> None:
    from bench import history

    rows = await history.measure(nats_server.url, [2, 5], budget=1300)
    assert rows[0].startswith("| turns |") and len(rows) == 4
    assert rows[2].startswith("| 2 | ") and "(2)" in rows[2]
    assert rows[3].startswith("| 5 | ") and "(2)" in rows[3]  # ~620-char turns: 2 fit


async def _get_log(port: int) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /bench/log HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    entries: list[dict[str, Any]] = orjson.loads(raw.partition(b"\r\n\r\n")[2])["entries"]
    return entries


async def test_upstream_tool_rounds_then_text(fake: int) -> None:
    """``-tools<K>``: one call of the request's first tool per round until the
    conversation after the last user message holds K results, then the text."""
    tools = [{"type": "function", "function": {"name": "srv__echo", "parameters": {}}}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for round_ in range(2):
        raw = await _exchange(fake, {"model": "fake-t3-d0-tools2", "stream": True,
                                     "tools": tools, "messages": messages})
        events = [e[len(b"data: "):] for e in _dechunk(raw.partition(b"\r\n\r\n")[2])
                  .split(b"\n\n") if e]
        assert events[-1] == b"[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        for chunk in chunks:
            validate("chat_completion_chunk", chunk)
        (call,) = chunks[0]["choices"][0]["delta"]["tool_calls"]
        assert call["function"]["name"] == "srv__echo" and call["index"] == 0
        assert orjson.loads(call["function"]["arguments"]) == {"text": f"r{round_}"}
        assert chunks[1]["choices"][0]["finish_reason"] == "tool_calls"
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": "ok"}]
    raw = await _exchange(fake, {"model": "fake-t3-d0-tools2", "tools": tools,
                                 "messages": messages})
    completion = orjson.loads(raw.partition(b"\r\n\r\n")[2])
    validate("chat_completion", completion)
    assert completion["choices"][0]["message"]["content"].split() == ["w0", "w1", "w2"]
    # A new user message starts the count again; no `tools`: the default name.
    raw = await _exchange(fake, {"model": "fake-t3-tools1", "messages": [
        *messages, {"role": "assistant", "content": "w0"}, {"role": "user", "content": "again"}]})
    message = orjson.loads(raw.partition(b"\r\n\r\n")[2])["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == upstream.DEFAULT_TOOL


async def test_upstream_log_is_opt_in_and_emptied_by_reading(fake: int) -> None:
    await _exchange(fake, {"model": "fake-t2", "messages": [{"role": "user", "content": "x"}]})
    for k in range(2):
        await _exchange(fake, {"model": "fake-t2-d0-log", "stream": k == 1, "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "w0"},
            {"role": "user", "content": f"m{k}"}]})
    entries = await _get_log(fake)
    assert [e["marker"] for e in entries] == ["m0", "m1"]  # not the unlogged model's
    for entry in entries:
        assert entry["history"] == ["a"] and entry["messages"] == 3
        assert entry["t_in"] <= entry["t_out"]
    assert entries[0]["t_out"] <= entries[1]["t_in"]
    assert await _get_log(fake) == []


def test_session_order_judges_overlap_history_and_gaps() -> None:
    from bench.sessions import session_order, tool_round_gaps

    def entry(marker: str, t_in: float, t_out: float, history: list[str]) -> dict[str, Any]:
        return {"marker": marker, "t_in": t_in, "t_out": t_out, "history": history,
                "tool_results": 0}

    good = [entry("a", 0.0, 0.001, []), entry("b", 0.002, 0.003, ["a"]),
            entry("c", 0.006, 0.007, ["b"])]  # a window that starts later is fine
    result = session_order(list(reversed(good)))
    assert (result["turns"], result["overlaps"], result["history_mismatches"]) == (3, 0, 0)
    assert result["gap_ms"]["p50"] == pytest.approx(1.0)
    assert result["gap_ms"]["max"] == pytest.approx(3.0)
    assert session_order(good, until=0.004)["gaps"] == 1  # after the load's end: left out
    bad = [entry("a", 0.0, 0.002, []), entry("b", 0.001, 0.003, ["a"]),
           entry("c", 0.004, 0.005, ["a"]), entry("c", 0.006, 0.007, ["a", "b", "c"])]
    result = session_order(bad)
    assert result["overlaps"] == 1 and result["history_mismatches"] == 1
    assert result["duplicates"] == 1 and result["examples"]
    late = session_order(bad, until=0.003)  # the third turn came after the load's end
    assert (late["history_mismatches"], late["history_mismatches_after"]) == (0, 1)
    rounds = [{"t_in": 0.0, "t_out": 0.001, "tool_results": 0},
              {"t_in": 0.003, "t_out": 0.004, "tool_results": 1},
              {"t_in": 0.010, "t_out": 0.011, "tool_results": 0}]
    gaps = tool_round_gaps(rounds)
    assert gaps["rounds"] == 1 and gaps["round_gap_ms"]["p50"] == pytest.approx(2.0)


def test_report_session_rows_and_targets() -> None:
    def rec(scenario: str, system: str = "clawbus", **values: Any) -> dict[str, Any]:
        return {"round": 1, "system": system, "scenario": scenario, **values}

    gap = {"p50": 1.5, "p99": 3.0}
    records = [
        rec("rps_c16", rps=1000.0, latency_us={"p50": 100.0}, error_count=0),
        rec("sessions_c16", rps=700.0, cpu_ms_per_request=1.2, error_count=0),
        rec("ttft_history_c1", "upstream", ttft_ms={"p50": 0.5}),
        rec("ttft_history_c1", ttft_ms={"p50": 3.0}),
        rec("hot_session", rps=400.0, cpu_ms_per_request=2.0, error_count=0,
            order={"gap_ms": gap, "overlaps": 0, "history_mismatches": 0, "duplicates": 0}),
        rec("tool_rounds_c1", rounds=4, tool_alone={"call_ms": {"p50": 0.5}}, runs={
            "0": {"latency_us": {"p50": 2000.0}, "cpu_ms_per_request": 1.0,
                  "round_gap_ms": {"p50": None}},
            "4": {"latency_us": {"p50": 10000.0}, "cpu_ms_per_request": 5.0,
                  "round_gap_ms": {"p50": 1.8}}}),
    ]
    raw = {"plan": {"duration": 1, "concurrency": [16], "ttft_concurrency": [], "held": [],
                    "held_rate": 250, "cpu_requests": 10, "slack_ms": 100, "sessions": 64,
                    "session_turns": 20, "history_sessions": 16, "hot_clients": 8,
                    "tool_rounds": 4},
           "machine": {"cpu": "test"}, "cpus": {"system": "0", "harness": "1"},
           "started": "2025-01-01T00:00:00", "records": records}
    text = report.render(raw, "bench/results/x.json", "python -m bench.run")
    assert "| **added** TTFT p50, c=1, sessions of 20+ turns (ms) |  | +2.50 | — |  |" in text
    assert "p50 / p99 (ms) |  | 1.50 / 3.00 | — |  |" in text
    assert "each with the turns before it |  | yes, every round | — |  |" in text
    assert "with 0 / 4 tool rounds (ms; clawbus only) |  | 2.00 / 10.00 |" in text
    assert "(0.50 ms: an MCP client's call round trip) |  | +1.50 |" in text
    assert "| stateful req/s at c=16 (64 sessions) ≥ 0.6× stateless (clawbus only) | " \
           "0.70× (700 vs 1,000) | yes |" in text
    assert "| CPU per stateful request ≤ 1.4 ms (clawbus only) | 1.20 ms | yes |" in text
    assert "| added TTFT p50 at c=1 in a session of 20+ turns ≤ 3 ms (clawbus only) | " \
           "+2.50 ms | yes |" in text
    assert "1.50 / 3.00 ms, in order: yes | **no** |" in text  # p99 over 2 ms
    assert "| added cost per agent tool round ≤ 2 ms (clawbus only) | +1.50 ms | yes |" in text


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
async def test_wrk_numbers_each_prompt(fake: int) -> None:
    """A body holding ``@N@`` gets each request's own number there."""
    body = b'{"model": "fake-t2-log", "messages": [{"role": "user", "content": "hot @N@"}]}'
    result = await asyncio.to_thread(
        wrk.run_wrk, shutil.which("wrk") or "wrk", f"http://127.0.0.1:{fake}/v1/chat/completions",
        body, auth=None, connections=2, duration=1, cpus=None, max_requests=20, sessions=1,
        session_prefix="hot-")
    markers = [e["marker"] for e in await _get_log(fake)]
    assert result["requests"] >= 20 and len(markers) >= 20
    assert len(set(markers)) == len(markers) and all(m.startswith("hot ") for m in markers)
    assert "@N@" not in "".join(markers)
