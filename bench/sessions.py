"""Helpers of the session scenarios (issue 20: sessions at the speed of stateless
calls): filling sessions with turns, reading the fake upstream's request log
(:mod:`bench.upstream`, ``-log`` models) and judging from it the order of a hot
session's turns and the time between them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from .procs import http_get, http_post
from .stats import median, summary
from .systems import HOT_AGENT, HOT_PACED_AGENT, tools_agent

SESSION_HEADER = "x-openclaw-session-key"


def chat_body(model: str, content: str) -> bytes:
    """A non-streaming chat completion request of one user message."""
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": content}]})


# The hot session's turns: wrk numbers each prompt (bench/wrk_post.lua, "@N@").
HOT_BODY = chat_body(f"openclaw/{HOT_AGENT}", "hot @N@")
HOT_PACED_BODY = chat_body(f"openclaw/{HOT_PACED_AGENT}", "hot @N@")


def tools_body(rounds: int) -> bytes:
    """A turn of the agent whose model asks for ``rounds`` tool rounds."""
    return chat_body(f"openclaw/{tools_agent(rounds)}", "hi")


def upstream_log(upstream_url: str) -> list[dict[str, Any]]:
    """The fake upstream's request log so far (``GET /bench/log``; the read empties it)."""
    status, body = http_get(f"{upstream_url}/bench/log", timeout=30.0)
    if status != 200:
        raise RuntimeError(f"GET /bench/log answered {status}: {body[:200]!r}")
    entries: list[dict[str, Any]] = orjson.loads(body)["entries"]
    return entries


def prefill(chat_url: str, auth: str | None, model: str, *, sessions: int, turns: int,
            prefix: str) -> float:
    """``turns`` non-streaming turns in each of ``sessions`` sessions
    (``<prefix><k>``), the sessions side by side, each one's turns one after
    another; raises on any failed turn. Returns the seconds it took."""
    headers = {"Authorization": f"Bearer {auth}"} if auth else {}

    def fill(k: int) -> None:
        for t in range(turns):
            body = orjson.dumps({"model": model, "messages": [
                {"role": "user", "content": f"prefill s{k} t{t}"}]})
            status, text = http_post(chat_url, body, {**headers, SESSION_HEADER: f"{prefix}{k}"})
            if status != 200:
                raise RuntimeError(f"prefill of session {prefix}{k}, turn {t}: HTTP {status}: "
                                   f"{text[:200]!r}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, sessions)) as pool:
        for future in [pool.submit(fill, k) for k in range(sessions)]:
            future.result()
    return time.monotonic() - t0


def session_order(entries: Sequence[dict[str, Any]], until: float | None = None
                  ) -> dict[str, Any]:
    """One session's turns as the upstream saw them (log entries, any order).

    * ``overlaps``: turns whose upstream request arrived before the previous turn's
      response had been written (two runs of the session at once);
    * ``history_mismatches``: turns whose history (the earlier user messages) is not
      the tail of the turns served before them, ending with the one just before
      (a turn missing, repeated or out of order; the window may start later), over
      the turns that arrived by ``until``; ``history_mismatches_after``: those
      that arrived later (once the clients have gone, a run whose client left may
      be dropped unstored: the next turn then lacks it, rightly);
    * ``duplicates``: prompts served more than once;
    * ``gap_ms``: previous turn's response end → this turn's request arrival, over
      the turns that arrived by ``until`` (monotonic; the load's end: after it the
      clients are gone and the queue drains differently);
    * ``history_turns``: how many earlier turns each request carried.
    """
    ordered = sorted(entries, key=lambda e: float(e["t_in"]))
    served = [str(e["marker"]) for e in ordered]
    overlaps = mismatches = after = 0
    gaps: list[float] = []
    first_bad: list[str] = []
    for i, (prev, cur) in enumerate(itertools.pairwise(ordered), start=1):
        if prev["t_out"] is None or float(cur["t_in"]) < float(prev["t_out"]):
            overlaps += 1
        elif until is None or float(cur["t_in"]) <= until:
            gaps.append((float(cur["t_in"]) - float(prev["t_out"])) * 1000.0)
        history = [str(h) for h in cur["history"]]
        if not history or history != served[max(0, i - len(history)):i]:
            if until is not None and float(cur["t_in"]) > until:
                after += 1
                continue
            mismatches += 1
            if len(first_bad) < 3:
                first_bad.append(f"{served[i]!r} carried {history[-3:]!r}, "
                                 f"served before it: {served[max(0, i - 3):i]!r}")
    return {
        "turns": len(ordered),
        "overlaps": overlaps,
        "history_mismatches": mismatches,
        "history_mismatches_after": after,
        "duplicates": len(served) - len(set(served)),
        "examples": first_bad,
        "gap_ms": summary(gaps),
        "gap_ms_median": median(gaps),
        "gaps": len(gaps),
        "history_turns": summary([float(len(e["history"])) for e in ordered]),
    }


def tool_round_gaps(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Tool rounds as the upstream saw them, runs one after another (c=1): a tool
    call's response end → the request carrying its result (the worker's whole
    round: the MCP call and the next model request)."""
    ordered = sorted(entries, key=lambda e: float(e["t_in"]))
    gaps = [(float(b["t_in"]) - float(a["t_out"])) * 1000.0
            for a, b in itertools.pairwise(ordered)
            if a["t_out"] is not None
            and int(b["tool_results"]) == int(a["tool_results"]) + 1]
    return {"rounds": len(gaps), "round_gap_ms": summary(gaps)}
