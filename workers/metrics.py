"""Prometheus metrics of one worker process, served by ``prometheus-client``'s
own HTTP server on ``--metrics-port`` (workers have no web app of their own)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from clawbus.gcstats import GCPauses
from clawbus.prom import Children

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0, 600.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.gc_pauses = GCPauses(r)
        self.runs = Counter("clawbus_worker_runs", "Run attempts by outcome", ["outcome"],
                            registry=r)
        self.errors = Counter("clawbus_worker_errors", "Provider errors by kind",
                              ["provider", "kind"], registry=r)
        self.provider_latency = Histogram(
            "clawbus_worker_provider_first_token_seconds",
            "From the provider call to its first token", ["provider"], buckets=BUCKETS,
            registry=r)
        self.run_duration = Histogram("clawbus_worker_run_duration_seconds",
                                      "Provider call duration", ["provider"], buckets=BUCKETS,
                                      registry=r)
        self.tokens = Counter("clawbus_worker_tokens", "Tokens reported by providers",
                              ["provider", "kind"], registry=r)
        self.active = Gauge("clawbus_worker_active_runs", "Runs executing now", registry=r)
        self.held = Gauge("clawbus_worker_held_runs",
                          "Runs held waiting for their session's earlier run", registry=r)
        self.naks = Counter("clawbus_worker_naks", "Runs handed back to the queue", registry=r)
        # Sessions (workers/session_turns.py): windows served from the worker's cache
        # or read from the transcript, and leases handed straight to the next run.
        self.history = Counter("clawbus_worker_history_windows",
                               "History windows served, by source (cache|stream)", ["source"],
                               registry=r)
        self.handovers = Counter("clawbus_worker_lease_handovers",
                                 "Session leases handed straight to the session's next run",
                                 registry=r)
        self.warm_leases = Counter("clawbus_worker_warm_leases",
                                   "Session leases kept between runs and taken by the "
                                   "session's next run (the worker alone)", registry=r)
        # Agent tools (SPEC §9); `server` is the MCP server's configured name, `tool`
        # the tool's own name on that server, `outcome` ok|error|timeout|cancelled.
        self.tool_calls = Counter("clawbus_worker_tool_calls", "Agent tool calls by outcome",
                                  ["server", "tool", "outcome"], registry=r)
        self.tool_call_seconds = Histogram("clawbus_worker_tool_call_seconds",
                                           "Agent tool call duration", ["server"],
                                           buckets=BUCKETS, registry=r)
        self.mcp_server_restarts = Counter(
            "clawbus_worker_mcp_server_restarts",
            "MCP server sessions started again after one ended", ["server"], registry=r)
        self.mcp_server_failures = Counter("clawbus_worker_mcp_server_failures",
                                           "MCP server starts that failed", ["server"],
                                           registry=r)
        # the labelled ones, by label values (bus/prom.py)
        self.runs_by = Children(self.runs)
        self.history_from_cache = self.history.labels("cache")
        self.history_from_stream = self.history.labels("stream")
        self.errors_by = Children(self.errors)
        self.provider_latency_by = Children(self.provider_latency)
        self.run_duration_by = Children(self.run_duration)
        self.tokens_by = Children(self.tokens)
        self.tool_calls_by = Children(self.tool_calls)
        self.tool_call_seconds_by = Children(self.tool_call_seconds)
        self.mcp_server_restarts_by = Children(self.mcp_server_restarts)
        self.mcp_server_failures_by = Children(self.mcp_server_failures)
