"""Tracing's configuration (SPEC §13): the ``telemetry`` keys, the ``OTEL_*``
variables and which wins (clawbus/telemetry.py), ``clawbus config check`` on
them; and, in this process, spans exported by the real SDK to the test receiver:
a model call with and without content capture, and log lines' trace ids.
The end-to-end traces are tests/test_tracing.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.messages import SamplingParams
from clawbus import telemetry, tracing
from clawbus.config import ConfigError, Settings, masked, parse_settings
from clawbus.logs import JsonFormatter, _RunContextFilter, run_context
from tests.fakes.otlp_receiver import OtlpReceiver
from workers.providers.base import ChatMessage, ProviderRequest, TextDelta
from workers.providers.echo import EchoProvider

REPO = Path(__file__).resolve().parent.parent


def settings(**telemetry_keys: Any) -> Settings:
    return parse_settings({"telemetry": telemetry_keys}, env={})


def test_off_by_default() -> None:
    assert telemetry.plan(settings(), {}, "gateway") is None
    assert telemetry.plan(settings(sampler="always_off"), {"OTEL_SERVICE_NAME": "x"},
                          "worker") is None


def test_the_config_endpoint_is_a_base_url_and_the_role_names_the_service() -> None:
    plan = telemetry.plan(settings(otlp={"endpoint": "http://collector:4318/"}), {}, "worker")
    assert plan is not None
    assert plan.endpoint == "http://collector:4318/v1/traces"
    assert plan.service_name == "clawbus-worker"
    assert (plan.sampler, plan.ratio) == ("parentbased_always_on", None)
    assert plan.capture_content is False
    assert plan.headers == {}
    assert plan.source == "telemetry.otlp.endpoint"


def test_the_variables_win_over_the_config() -> None:
    configured = settings(otlp={"endpoint": "http://config:4318", "headers": {"x-key": "k"}},
                          serviceName="from-config", sampler="always_on",
                          captureContent=True)
    plan = telemetry.plan(configured, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-key=env",
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "false"}, "gateway")
    assert plan is not None
    assert plan.endpoint == "http://env:4318/v1/traces"
    assert plan.source == "OTEL_EXPORTER_OTLP_ENDPOINT"
    assert plan.headers is None  # the exporter reads the variable
    assert plan.service_name is None  # the SDK reads OTEL_SERVICE_NAME
    assert (plan.sampler, plan.ratio) == ("parentbased_traceidratio", 0.25)
    assert plan.capture_content is False
    # The traces endpoint is a whole URL and beats the base one.
    plan = telemetry.plan(configured, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318",
                                       "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"},
                          "gateway")
    assert plan is not None and plan.endpoint == "http://t/x"
    assert plan.service_name == "from-config" and plan.headers == {"x-key": "k"}
    assert plan.capture_content is True
    # service.name in OTEL_RESOURCE_ATTRIBUTES names the service too.
    plan = telemetry.plan(configured, {"OTEL_RESOURCE_ATTRIBUTES": "a=b, service.name=n"},
                          "gateway")
    assert plan is not None and plan.service_name is None


@pytest.mark.parametrize("env", [{"OTEL_SDK_DISABLED": "true"},
                                 {"OTEL_TRACES_EXPORTER": "none"}])
def test_the_variables_can_turn_it_off(env: dict[str, str]) -> None:
    assert telemetry.plan(settings(otlp={"endpoint": "http://c:4318"}), env, "gateway") is None


@pytest.mark.parametrize(("env", "problem"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTLP only"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "from 0 to 1"),
    ({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "maybe"}, "true or false"),
])
def test_unusable_variables_are_config_errors(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        telemetry.plan(settings(otlp={"endpoint": "http://c:4318"}), env, "gateway")


@pytest.mark.parametrize(("keys", "problem"), [
    ({"sampler": "sometimes"}, "telemetry.sampler: .*not one of"),
    ({"sampler": "always_on:0.5"}, "takes no ratio"),
    ({"sampler": "traceidratio:1.5"}, "from 0 to 1"),
    ({"otlp": {"endpoint": "collector:4318"}}, "telemetry.otlp.endpoint: .*http"),
    ({"otlp": {"headers": {"bad name": "x"}}}, "not an HTTP token"),
    ({"serviceName": ""}, "telemetry.serviceName"),
    ({"captureContent": "yes"}, "telemetry.captureContent"),
    ({"exporter": "otlp"}, "telemetry.exporter: unknown key"),
])
def test_bad_telemetry_config(keys: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        settings(**keys)


def test_samplers_parse_and_headers_are_masked() -> None:
    configured = settings(sampler="TraceIdRatio:0.5",
                          otlp={"endpoint": "https://c", "headers": {"api-key": "secret"}})
    assert configured.telemetry.sampler == "traceidratio:0.5"
    shown = masked(configured)["telemetry"]
    assert shown["otlp"] == {"endpoint": "https://c", "headers": {"api-key": "***"}}
    assert shown["sampler"] == "traceidratio:0.5"


def check(tmp_path: Path, config: dict[str, Any], **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.json5"
    path.write_text(json.dumps(config))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-m", "clawbus", "config", "check", "--config", str(path)],
        cwd=REPO, env={**clean, "CLAWBUS_STATE_DIR": str(tmp_path / "state"), **env},
        capture_output=True, text=True, timeout=60, check=False)


def test_config_check_reports_tracing(tmp_path: Path) -> None:
    proc = check(tmp_path, {"telemetry": {"sampler": "sometimes"}})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "telemetry.sampler" in proc.stderr and "Traceback" not in proc.stderr
    proc = check(tmp_path, {"telemetry": {"otlp": {"endpoint": "http://127.0.0.1:4318"}}})
    assert proc.returncode == 0, proc.stderr
    assert "tracing on: OTLP/HTTP to http://127.0.0.1:4318/v1/traces" in proc.stderr
    proc = check(tmp_path, {}, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
                 OTEL_TRACES_SAMPLER="often")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "OTEL_TRACES_SAMPLER" in proc.stderr and "Traceback" not in proc.stderr
    proc = check(tmp_path, {})
    assert proc.returncode == 0 and "tracing" not in proc.stderr


@pytest.mark.parametrize("command", [["gateway", "--port", "0"], ["worker"], ["up"]])
def test_processes_refuse_an_unusable_otel_variable_before_starting(
        tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "c.json5"
    path.write_text("{}")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "clawbus", *command, "--config", str(path)], cwd=REPO,
        env={**clean, "CLAWBUS_STATE_DIR": str(tmp_path / "state"),
             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_SAMPLER": "often"},
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "OTEL_TRACES_SAMPLER" in proc.stderr and "Traceback" not in proc.stderr


def test_tracing_off_imports_neither_sdk_nor_spans() -> None:
    code = ("import sys, gateway.app, workers.worker, workers.main, clawbus.main; "
            "bad = [m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter')) or m == 'clawbus.spans']; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- in this process


@pytest.fixture(autouse=True)
def switched_off() -> Iterator[None]:
    """Whatever a test did, tracing is off for the next one (it is process-wide)."""
    yield
    tracing.disable()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def traced(receiver: OtlpReceiver, **keys: Any) -> telemetry.Telemetry:
    setup = telemetry.setup(settings(otlp={"endpoint": receiver.endpoint}, **keys), {},
                            "worker", "w-test")
    assert setup is not None and tracing.ENABLED
    return setup


async def echo_call(text: str) -> str:
    from workers.providers.traced import TracedProvider

    provider = TracedProvider(EchoProvider(), "echo", tracing.spans())
    request = ProviderRequest(model="echo", system="be brief",
                              messages=(ChatMessage("user", text),),
                              params=SamplingParams(max_tokens=50))
    with tracing.span("run"):
        return "".join([item.text async for item in provider.stream(request)
                        if isinstance(item, TextDelta)])


@pytest.mark.parametrize("capture", [False, True])
async def test_a_model_call_span_holds_text_only_with_capture_content(
        receiver: OtlpReceiver, capture: bool) -> None:
    setup = traced(receiver, captureContent=capture)
    try:
        reply = await echo_call("secret words here")
    finally:
        setup.shutdown()  # exports what is left
    assert not tracing.ENABLED
    (call,) = [s for s in receiver.spans if s.kind == "client"]
    assert call.name == "chat echo"
    assert call.resource["service.name"] == "clawbus-worker"
    assert call.resource["service.instance.id"] == "w-test"
    assert call.attributes["gen_ai.system"] == "echo"
    assert call.attributes["gen_ai.request.max_tokens"] == 50
    assert call.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    events = {e.name: e.attributes for e in call.events}
    assert "gen_ai.first_token" in events
    if capture:
        assert "secret words here" in str(events["gen_ai.prompt"]["gen_ai.prompt"])
        assert events["gen_ai.completion"]["gen_ai.completion"] == reply
    else:
        assert "secret" not in "\n".join(s.text() for s in receiver.spans)


def test_json_log_lines_carry_the_span_ids(receiver: OtlpReceiver) -> None:
    setup = traced(receiver)
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    try:
        with run_context("run-1", "s"), tracing.span("logged") as span:
            assert span is not None
            _RunContextFilter().filter(record)
            context = span.get_span_context()
    finally:
        setup.shutdown()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")
    assert entry["run_id"] == "run-1"
    # Off: no ids, and the line is as before.
    plain = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    _RunContextFilter().filter(plain)
    assert "trace_id" not in json.loads(JsonFormatter().format(plain))
