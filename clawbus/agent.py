"""``clawbus agent``: one agent turn through the bus, from the terminal.

It takes exactly the path an HTTP or WebSocket run takes (``RunClient``), so
the same session key continues the same conversation whichever door was used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from typing import Any

from bus.connection import connect, ensure_bus
from bus.messages import ToolEvent
from clawbus.config import Settings
from gateway.agent_turn import agent_turn
from gateway.errors import ApiError
from gateway.runs import NoWorkerError, RunClient, RunRejected

EXIT_FAILED = 1
EXIT_USAGE = 2


async def run_turn(settings: Settings, bus_url: str, params: dict[str, Any],
                   as_json: bool) -> int:
    try:
        spec = agent_turn(params, settings)
    except ApiError as exc:
        print(f"clawbus agent: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    nc = await connect(bus_url, "clawbus-agent")
    try:
        js = await ensure_bus(nc, settings.bus, settings.session)
        runs = RunClient(nc, js, settings.bus, longest_run=settings.longest_agent_timeout())
        await runs.start()
        try:
            return await _follow(runs, spec, as_json)
        finally:
            await runs.close()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


STEP_PREVIEW = 200


def tool_step(event: ToolEvent) -> str:
    """One line on stderr per agent tool step."""
    if event.phase == "start":
        return f"[tool] {event.name}({_preview(event.args)})"
    mark = "error" if event.is_error else "result"
    return f"[tool] {event.name} → {mark}: {_preview(event.result)}"


def _preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= STEP_PREVIEW else text[:STEP_PREVIEW - 1] + "…"


async def _follow(runs: RunClient, spec: Any, as_json: bool) -> int:
    try:
        handle = await runs.submit(dataclasses.replace(spec, tool_events=True), door="cli")
    except RunRejected as exc:
        print(f"clawbus agent: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    steps: list[dict[str, Any]] = []
    try:
        async for event in handle.events():
            if event.type == "delta" and not as_json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif event.type == "tool":
                if as_json:
                    steps.append({"phase": event.phase, "name": event.name,
                                  "toolCallId": event.call_id, **(
                                      {"args": event.args} if event.phase == "start" else
                                      {"isError": event.is_error, "result": event.result})})
                else:
                    sys.stdout.flush()
                    print(tool_step(event), file=sys.stderr, flush=True)
            elif event.type == "done":
                if as_json:
                    print(json.dumps({
                        "runId": handle.run_id, "agentId": spec.agent_id,
                        "sessionKey": spec.session_key, "status": "ok", "text": event.text,
                        "finishReason": event.finish_reason, "toolSteps": steps,
                        "usage": {"prompt_tokens": event.usage.prompt_tokens,
                                  "completion_tokens": event.usage.completion_tokens,
                                  "total_tokens": event.usage.total_tokens}}))
                else:
                    if not handle.streamed:
                        sys.stdout.write(event.text)
                    sys.stdout.write("\n")
                return 0
            elif event.type == "error":
                if handle.streamed and not as_json:
                    sys.stdout.write("\n")
                print(f"clawbus agent: {event.message} ({event.error_type})", file=sys.stderr)
                return EXIT_FAILED
    except NoWorkerError:
        print("clawbus agent: No agent worker available. Is `clawbus up` (or a "
              "`clawbus worker`) running on this bus?", file=sys.stderr)
        return EXIT_FAILED
    except asyncio.CancelledError:
        await handle.cancel()
        raise
    print("clawbus agent: the run ended without a result", file=sys.stderr)
    return EXIT_FAILED
