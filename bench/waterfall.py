"""A real trace, captured and drawn as a text waterfall (docs/TRACING.md)::

    python -m bench.waterfall            # capture one, print it
    python -m bench.waterfall --json t.json   # also keep the spans

Starts a fake OpenAI-compatible model (tests/fakes/openai_upstream.py, tokens
paced 20 ms apart), a stdio MCP server of the tests' tools, an OTLP/HTTP receiver
(tests/fakes/otlp_receiver.py) and ``clawbus up`` (two workers) tracing to it;
sends one streamed session turn, with a client ``traceparent``, whose agent calls
an MCP tool and then answers; prints that trace's spans as a tree with bars on
one time axis, and the attributes of the model calls.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import openai
import orjson

from tests.fakes.http_upstream import FakeReply, text_of
from tests.fakes.mcp_servers import stdio_command
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.otlp_receiver import OtlpReceiver, Span
from tests.procs import clawbus_up, write_config

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "waterfall-token"
WIDTH = 48
SHOWN_ATTRIBUTES = ("gen_ai.operation.name", "gen_ai.system", "gen_ai.request.model",
                    "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
                    "gen_ai.usage.output_tokens", "gen_ai.tool.name", "clawbus.attempt",
                    "clawbus.queue_wait_ms", "clawbus.outcome", "http.response.status_code")


def _model(body: dict[str, Any]) -> str | FakeReply:
    if not any(m["role"] == "tool" for m in body["messages"]):
        return FakeReply("Let me add that up.", [("calc__add", '{"a": 40, "b": 2}')])
    result = next(text_of(m["content"]) for m in reversed(body["messages"])
                  if m["role"] == "tool")
    return f"The answer is {result}, as the calculator says."


def capture() -> list[Span]:
    """One traced turn through a fresh ``clawbus up``: the spans of its trace."""
    with tempfile.TemporaryDirectory(prefix="clawbus-waterfall-") as tmp, \
            OtlpReceiver() as receiver, FakeOpenAI(reply=_model, token_delay=0.02) as upstream:
        directory = Path(tmp)
        config = {
            "gateway": {"auth": {"token": TOKEN},
                        "http": {"endpoints": {"chatCompletions": {"enabled": True}}}},
            "agents": {"defaults": {"model": "openai/gpt-4o-mini", "tools": {
                "mcpServers": {"calc": {"command": stdio_command(), "cwd": str(ROOT)}}}}},
            "models": {"providers": {"openai": {"api": "openai-completions",
                                                "baseUrl": upstream.base_url,
                                                "apiKey": "sk-fake"}}},
            "telemetry": {"otlp": {"endpoint": receiver.endpoint}},
        }
        path = write_config(directory / "clawbus.json5", config)
        with clawbus_up(path, directory / "state",
                        env={"OTEL_BSP_SCHEDULE_DELAY": "50"}) as (_, url):
            trace_id = secrets.token_hex(16)
            traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
            with openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0) as client:
                stream = client.chat.completions.create(
                    model="openclaw", user="waterfall", stream=True,
                    messages=[{"role": "user", "content": "What is 40 + 2?"}],
                    extra_headers={"traceparent": traceparent})
                for _ in stream:
                    pass
            spans = receiver.wait_for(lambda spans: {"server", "consumer"} <= {
                s.kind for s in spans if s.trace_id == trace_id})
    return [s for s in spans if s.trace_id == trace_id]


def render(spans: list[Span]) -> str:
    """The spans as an indented tree, each with its bar on the trace's time axis."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = {}
    for span in spans:
        children.setdefault(span.parent_id if span.parent_id in ids else "", []).append(span)
    start = min(s.start_ns for s in spans)
    total = max(max(s.end_ns for s in spans) - start, 1)
    rows: list[tuple[str, str, str, str]] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            left = round((span.start_ns - start) / total * WIDTH)
            right = max(left + 1, round((span.end_ns - start) / total * WIDTH))
            bar = " " * left + "█" * (right - left) + " " * (WIDTH - right)
            label = "  " * depth + f"{span.name} ({span.kind})"
            rows.append((label, span.service, bar,
                         f"{(span.end_ns - span.start_ns) / 1e6:8.1f} ms"))
            walk(span.span_id, depth + 1)

    walk("", 0)
    name_width = max(len(r[0]) for r in rows)
    service_width = max(len(r[1]) for r in rows)
    axis = f"0 ms{'':{WIDTH - 4 - len(f'{total / 1e6:.0f} ms')}}{total / 1e6:.0f} ms"
    lines = [f"{'span':{name_width}}  {'service':{service_width}}  {axis}",
             *(f"{label:{name_width}}  {service:{service_width}}  {bar}{took}"
               for label, service, bar, took in rows)]
    lines.append("")
    for span in sorted(spans, key=lambda s: s.start_ns):
        shown = {k: span.attributes[k] for k in SHOWN_ATTRIBUTES if k in span.attributes}
        events = [e.name for e in span.events]
        if shown or events:
            lines.append(f"{span.name}: "
                         + ", ".join(f"{k}={_text(v)}" for k, v in shown.items())
                         + (f"; events: {', '.join(events)}" if events else ""))
    return "\n".join(lines)


def _text(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.waterfall",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the spans here")
    args = parser.parse_args(argv)
    spans = capture()
    if args.json is not None:
        args.json.write_bytes(orjson.dumps([s.__dict__ for s in spans],
                                           option=orjson.OPT_INDENT_2))
    sys.stdout.write(render(spans) + "\n")


if __name__ == "__main__":
    main()
