"""What ``clawbus up`` and ``clawbus cluster`` share: loading the settings named
on the command line, and the command lines of the gateway and worker processes
they start (the same program, ``python -m clawbus``, one role each)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import Settings, load_settings
from .telemetry import plan


def load(args: argparse.Namespace) -> Settings:
    """The settings from ``--config`` (or the default places; SPEC §1), with the
    ``OTEL_*`` variables checked too (ConfigError, before anything starts)."""
    settings = load_settings(args.config)
    plan(settings, os.environ, "gateway")
    return settings


def _role(role: str, args: argparse.Namespace, bus_url: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "clawbus", role, "--bus-url", bus_url, *extra,
           "--log-level", args.log_level]
    log_format = getattr(args, "log_format", None)
    if log_format:
        cmd += ["--log-format", str(log_format)]
    if args.config:
        cmd += ["--config", str(args.config)]
    return cmd


def worker_command(args: argparse.Namespace, bus_url: str) -> list[str]:
    """One worker process on ``bus_url``, with the caller's config and logging."""
    return _role("worker", args, bus_url)


def gateway_command(args: argparse.Namespace, bus_url: str, port: int, *,
                    reuse_port: bool = False) -> list[str]:
    """One gateway process on ``bus_url`` listening on ``port``; ``reuse_port``:
    bound with SO_REUSEPORT to share the port with other gateways."""
    return _role("gateway", args, bus_url, "--port", str(port),
                 *(["--reuse-port"] if reuse_port else []))
