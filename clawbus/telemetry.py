"""Turning OpenTelemetry tracing on for one process (SPEC §13).

Tracing is off unless an OTLP endpoint is configured: the standard variables
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the full URL) or
``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL, ``/v1/traces`` appended), else
``telemetry.otlp.endpoint`` in the config (a base URL too). As OpenTelemetry's
own SDKs do, explicitly set ``OTEL_*`` variables win over the config file
(variables first, then the config key):

- endpoint: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_ENDPOINT``;
  ``telemetry.otlp.endpoint``
- export headers: ``OTEL_EXPORTER_OTLP_TRACES_HEADERS``, ``OTEL_EXPORTER_OTLP_HEADERS``;
  ``telemetry.otlp.headers``
- ``service.name``: ``OTEL_SERVICE_NAME``, or ``service.name`` in
  ``OTEL_RESOURCE_ATTRIBUTES``; ``telemetry.serviceName``
- sampler: ``OTEL_TRACES_SAMPLER`` (with ``OTEL_TRACES_SAMPLER_ARG``); ``telemetry.sampler``
- prompt and reply text in spans: ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``;
  ``telemetry.captureContent``

``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off whatever
is configured. Without a name set, a process is ``clawbus-gateway`` or
``clawbus-worker``; ``service.instance.id`` is always its gateway or worker id.
Spans go out over OTLP/HTTP (protobuf) in batches (``OTEL_BSP_*`` tune them).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import tracing
from .config import ConfigError, Settings, parse_sampler

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler

log = logging.getLogger("clawbus.telemetry")

TRACES_PATH = "/v1/traces"
ENV_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


@dataclass(frozen=True, slots=True)
class TracingPlan:
    """What tracing will do in a process, settings and environment combined.

    ``endpoint`` is the full traces URL; ``headers`` None means the exporter
    reads them from the environment; ``service_name`` None means the environment
    names the service."""

    endpoint: str
    sampler: str
    ratio: float | None
    capture_content: bool
    service_name: str | None
    headers: dict[str, str] | None = field(default=None)
    source: str = "config"  # where the endpoint came from: "config" or a variable

    def describe(self) -> str:
        sampler = self.sampler if self.ratio is None else f"{self.sampler}:{self.ratio:g}"
        return (f"tracing on: OTLP/HTTP to {self.endpoint} (from {self.source}), "
                f"sampler {sampler}, content capture {'on' if self.capture_content else 'off'}")


def plan(settings: Settings, env: Mapping[str, str], role: str) -> TracingPlan | None:
    """The tracing of a ``role`` ("gateway", "worker") process, or None when off.
    ConfigError for an ``OTEL_*`` variable clawbus cannot use."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return None
    if exporter not in ("", "otlp"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: clawbus exports traces with "
                          f"OTLP only ('otlp' or 'none')")
    telemetry = settings.telemetry
    if env.get(ENV_TRACES_ENDPOINT):
        endpoint, source = env[ENV_TRACES_ENDPOINT], ENV_TRACES_ENDPOINT
    elif env.get(ENV_ENDPOINT):
        endpoint, source = _traces_url(env[ENV_ENDPOINT]), ENV_ENDPOINT
    elif telemetry.otlp.endpoint:
        endpoint, source = _traces_url(telemetry.otlp.endpoint), "telemetry.otlp.endpoint"
    else:
        return None
    sampler_text = telemetry.sampler
    if env.get("OTEL_TRACES_SAMPLER"):
        sampler_text = env["OTEL_TRACES_SAMPLER"]
        if env.get("OTEL_TRACES_SAMPLER_ARG"):
            sampler_text += f":{env['OTEL_TRACES_SAMPLER_ARG']}"
    try:
        sampler, ratio = parse_sampler(sampler_text)
    except ValueError as exc:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: {exc}") from None
    capture = telemetry.capture_content
    if ENV_CAPTURE in env:
        value = env[ENV_CAPTURE].strip().lower()
        if value not in _TRUE + _FALSE:
            raise ConfigError(f"{ENV_CAPTURE}={env[ENV_CAPTURE]!r}: use true or false")
        capture = value in _TRUE
    named_in_env = bool(env.get("OTEL_SERVICE_NAME")) or any(
        part.split("=", 1)[0].strip() == "service.name"
        for part in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","))
    service_name = None if named_in_env else (telemetry.service_name or f"clawbus-{role}")
    env_headers = any(env.get(name) for name in ("OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                                                  "OTEL_EXPORTER_OTLP_HEADERS"))
    headers = None if env_headers else dict(telemetry.otlp.headers)
    return TracingPlan(endpoint=endpoint, sampler=sampler, ratio=ratio,
                       capture_content=capture, service_name=service_name, headers=headers,
                       source=source)


def _traces_url(base: str) -> str:
    return base.rstrip("/") + TRACES_PATH


def _sampler(name: str, ratio: float | None) -> Sampler:
    from opentelemetry.sdk.trace import sampling

    root: Sampler
    if name.endswith("always_on"):
        root = sampling.ALWAYS_ON
    elif name.endswith("always_off"):
        root = sampling.ALWAYS_OFF
    else:
        root = sampling.TraceIdRatioBased(1.0 if ratio is None else ratio)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


class Telemetry:
    """Tracing as set up in this process; :meth:`shutdown` exports what is left."""

    def __init__(self, provider: TracerProvider, the_plan: TracingPlan) -> None:
        self.provider = provider
        self.plan = the_plan

    def shutdown(self) -> None:
        tracing.disable()
        self.provider.shutdown()  # flushes the batch processor


def setup(settings: Settings, env: Mapping[str, str], role: str,
          instance_id: str) -> Telemetry | None:
    """Turn tracing on for this process as :func:`plan` says (None: it stays off).
    ``instance_id`` (the gateway or worker id) becomes ``service.instance.id``."""
    the_plan = plan(settings, env, role)
    if the_plan is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from .spans import Spans

    attributes: dict[str, str] = {"service.instance.id": instance_id, "clawbus.role": role}
    if the_plan.service_name is not None:
        attributes["service.name"] = the_plan.service_name
    provider = TracerProvider(resource=Resource.create(attributes),
                              sampler=_sampler(the_plan.sampler, the_plan.ratio))
    exporter = OTLPSpanExporter(endpoint=the_plan.endpoint, headers=the_plan.headers)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracing.enable(Spans(provider.get_tracer("clawbus"),
                         capture_content=the_plan.capture_content))
    log.info("%s (service.instance.id %s)", the_plan.describe(), instance_id)
    return Telemetry(provider, the_plan)
