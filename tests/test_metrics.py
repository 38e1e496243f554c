"""``/metrics`` on gateways and workers (Prometheus text format, parsed with
prometheus-client's own parser) and JSON-lines logs with the run context."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN, Stack, base_config
from tests.procs import Worker, wait_until

METRICS_URL = re.compile(r"worker metrics on (http://\S+/metrics)")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_gateway_metrics_move_with_traffic(stack: Stack) -> None:
    url = stack.gateways[0].url
    before = httpx.get(f"{url}/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(before.text)}
    assert names >= {"clawbus_http_requests", "clawbus_runs", "clawbus_run_duration_seconds",
                     "clawbus_time_to_first_token_seconds", "clawbus_queue_wait_seconds",
                     "clawbus_active_streams", "clawbus_active_runs", "clawbus_ws_connections",
                     "clawbus_bus_round_trips", "clawbus_bus_errors", "clawbus_workers_alive",
                     "clawbus_gc_pause_seconds", "process_resident_memory_bytes"}
    assert value(before.text, "clawbus_workers_alive") == 3
    with openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0) as c:
        for _ in range(3):
            c.chat.completions.create(model="openclaw",
                                      messages=[{"role": "user", "content": "count me"}])
        list(c.chat.completions.create(model="openclaw", stream=True,
                                       messages=[{"role": "user", "content": "me too"}]))
        with contextlib.suppress(openai.BadRequestError):
            c.chat.completions.create(model="nope", messages=[])
    after = httpx.get(f"{url}/metrics").text

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before.text, name, **labels)

    assert delta("clawbus_http_requests_total", endpoint="/v1/chat/completions",
                 status="200") == 4
    assert delta("clawbus_http_requests_total", endpoint="/v1/chat/completions",
                 status="400") == 1
    assert delta("clawbus_runs_total", door="http", outcome="ok") == 4
    assert delta("clawbus_run_duration_seconds_count") == 4
    assert delta("clawbus_time_to_first_token_seconds_count") == 4
    assert delta("clawbus_queue_wait_seconds_count") == 4
    assert delta("clawbus_bus_round_trips_total", op="publish_run") == 4
    assert value(after, "clawbus_active_streams") == 0


def test_worker_metrics_and_json_logs(tmp_path: Path) -> None:
    with FakeOpenAI() as up:
        st = Stack.start(tmp_path, up, base_config(up), workers=0)
        try:
            worker = Worker(st.config, st.nats.url, extra_args=[
                "--metrics-port", "0", "--log-format", "json", "--log-level", "debug"])
            st.workers.append(worker)
            metrics_url = worker.wait_line(METRICS_URL).group(1)
            with openai.OpenAI(base_url=f"{st.url}/v1", api_key=TOKEN, max_retries=0) as c:
                c.chat.completions.create(
                    model="openclaw", user="Metrics-User",
                    messages=[{"role": "user", "content": "four words right here"}])
                up.fail_status = 429
                with contextlib.suppress(openai.RateLimitError):
                    c.chat.completions.create(model="openclaw",
                                              messages=[{"role": "user", "content": "x"}])
            text = httpx.get(metrics_url).text
            assert value(text, "clawbus_worker_runs_total", outcome="completed") == 1
            assert value(text, "clawbus_worker_runs_total", outcome="failed") == 1
            assert value(text, "clawbus_worker_errors_total", provider="fake",
                         kind="rate_limit") == 1
            assert value(text, "clawbus_worker_tokens_total", provider="fake",
                         kind="completion") == 5  # "echo: four words right here"
            assert value(text, "clawbus_worker_provider_first_token_seconds_count",
                         provider="fake") == 1
            assert value(text, "clawbus_worker_active_runs") == 0
            assert "clawbus_gc_pause_seconds_bucket" in text
            wait_until(lambda: sum('"run_id"' in ln for ln in worker.lines) >= 4)
        finally:
            st.stop()
    records = [json.loads(ln) for ln in worker.lines if ln.startswith("{")]
    assert records, worker.output()
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    in_runs = [r for r in records if "run_id" in r]
    assert {r["session_key"] for r in in_runs} >= {"agent:main:openai-user:metrics-user"}
    assert all(r["run_id"].startswith("chatcmpl_") for r in in_runs)
