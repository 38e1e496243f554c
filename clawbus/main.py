"""The ``clawbus`` command line (SPEC §5).

- ``clawbus up``: embedded NATS (when ``bus.url`` is null) + the gateway + N
  worker processes; one Ctrl-C stops everything, workers first drained.
- ``clawbus gateway`` / ``clawbus worker``: one role each, for scaling out.
- ``clawbus config check``: validate a config and print it with secrets masked.

With ``bus.url`` null, ``gateway`` and ``worker`` first look for a running
``clawbus up`` (its address is in the state dir) and otherwise start their own
embedded ``nats-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from .children import spawn
from .config import ConfigError, Settings, check_gateway_startable, masked
from .launch import gateway_command, load, worker_command
from .logs import setup_logging
from .statedir import clear_running, read_running, write_running

GC_GEN0_THRESHOLD = 20_000
log = logging.getLogger("clawbus")


@contextlib.contextmanager
def _bus(settings: Settings, explicit_url: str | None, *, reuse_running: bool) -> Iterator[str]:
    """The bus URL to use, starting an embedded nats-server when none is configured."""
    url = explicit_url or settings.bus.url
    if url:
        yield url
        return
    from .natsserver import NatsServer

    if reuse_running:
        running = read_running(settings.state_dir)
        if running and running.get("bus_url"):
            yield str(running["bus_url"])
            return
    store = settings.state_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    server = NatsServer(store_dir=store)
    server.start()
    log.info("embedded nats-server %s on %s (data in %s)", server.pid, server.url, store)
    try:
        yield server.url
    finally:
        server.stop()


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket other processes can bind too (SO_REUSEPORT): the kernel
    spreads connections over every gateway process on the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _serve_gateway(settings: Settings, bus_url: str, port: int | None,
                   on_listening: list[str] | None = None,
                   sock: socket.socket | None = None) -> None:
    import uvicorn

    from gateway.app import create_app

    app = create_app(settings, bus_url)
    config = uvicorn.Config(
        app, host=settings.gateway.host,
        port=settings.gateway.port if port is None else port,
        loop="uvloop", http="httptools", ws="websockets-sansio", lifespan="on",
        log_level="warning", access_log=False, timeout_graceful_shutdown=5,
    )

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Like uvicorn's, minus re-raising the signal after shutdown: SIGINT or
            # SIGTERM here means "shut down cleanly", and the caller still has
            # workers and the embedded NATS to stop after serve() returns.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                host, bound = self.servers[0].sockets[0].getsockname()[:2]
                url = f"http://{host}:{bound}"
                if on_listening is not None:
                    on_listening.append(url)
                # Tests and scripts wait for this line to learn the (maybe random) port.
                print(f"clawbus gateway listening on {url}", flush=True)

    Server(config).run(sockets=[sock] if sock is not None else None)


def cmd_up(args: argparse.Namespace) -> int:
    settings = load(args)
    check_gateway_startable(settings)
    if not settings.gateway.http.endpoints.chat_completions.enabled:
        log.warning("gateway.http.endpoints.chatCompletions.enabled is false: "
                    "/v1/chat/completions answers 404")
    with _bus(settings, args.bus_url, reuse_running=False) as bus_url:
        # Own process groups: a terminal's Ctrl-C reaches only us; we stop them in order.
        workers = [spawn(worker_command(args, bus_url), process_group=0)
                   for _ in range(args.workers)]
        sock = None
        port = settings.gateway.port if args.port is None else args.port
        if args.gateways > 1:
            # Extra gateway processes share this port (SO_REUSEPORT); with port 0
            # they all use the one the first socket was given.
            sock = reuse_port_socket(settings.gateway.host, port)
            port = sock.getsockname()[1]
            workers += [spawn(gateway_command(args, bus_url, port, reuse_port=True),
                              process_group=0)
                        for _ in range(args.gateways - 1)]
        listening: list[str] = []
        try:
            write_running(settings.state_dir, {"bus_url": bus_url, "pid": os.getpid()})
            _serve_gateway(settings, bus_url, port, listening, sock)
        finally:
            clear_running(settings.state_dir)
            for proc in workers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in workers:
                try:
                    proc.wait(timeout=args.grace + 5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    settings = load(args)
    check_gateway_startable(settings)
    with _bus(settings, args.bus_url, reuse_running=True) as bus_url:
        sock = None
        if args.reuse_port:
            port = settings.gateway.port if args.port is None else args.port
            sock = reuse_port_socket(settings.gateway.host, port)
        _serve_gateway(settings, bus_url, args.port, sock=sock)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import serve

    settings = load(args)
    with _bus(settings, args.bus_url, reuse_running=True) as bus_url:
        coro = serve(settings, bus_url, grace_seconds=args.grace,
                     metrics_port=args.metrics_port, metrics_host=args.metrics_host)
        try:
            import uvloop
        except ImportError:  # not on every platform
            asyncio.run(coro)
        else:
            uvloop.run(coro)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent import EXIT_USAGE, run_turn

    settings = load(args)
    bus_url = args.bus_url or settings.bus.url
    if not bus_url:
        running = read_running(settings.state_dir)
        bus_url = str(running["bus_url"]) if running and running.get("bus_url") else None
    if not bus_url:
        print("clawbus agent: no bus to send the run to: start `clawbus up`, or set "
              "bus.url / --bus-url", file=sys.stderr)
        return EXIT_USAGE
    params = {"message": args.message, "agentId": args.agent, "sessionKey": args.session_key,
              "extraSystemPrompt": args.extra_system_prompt}
    return asyncio.run(run_turn(settings, bus_url, params, args.json))


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load(args)
    print(json.dumps(masked(settings), indent=2))
    try:
        check_gateway_startable(settings)
    except ConfigError as exc:
        print(f"warning: a gateway would not start: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clawbus", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=None, help="JSON5 config file")
        p.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
        p.add_argument("--log-format", default="text", choices=["text", "json"],
                       help="json: one JSON object per line, with run id and session key")

    up = sub.add_parser("up", help="embedded NATS + gateway + workers on this machine")
    common(up)
    up.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    up.add_argument("--gateways", type=int, default=1,
                    help="gateway processes sharing the port via SO_REUSEPORT (default 1)")
    up.add_argument("--port", type=int, default=None, help="override gateway.port (0: any)")
    up.add_argument("--bus-url", default=None, help="use this NATS instead of bus.url")
    up.add_argument("--grace", type=float, default=30.0, help="worker drain seconds on stop")
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="run one gateway (HTTP + WebSocket)")
    common(gw)
    gw.add_argument("--port", type=int, default=None, help="override gateway.port (0: any)")
    gw.add_argument("--bus-url", default=None, help="use this NATS instead of bus.url")
    gw.add_argument("--reuse-port", action="store_true",
                    help="bind with SO_REUSEPORT so several gateways can share the port")
    gw.set_defaults(func=cmd_gateway)

    wk = sub.add_parser("worker", help="run one agent worker")
    common(wk)
    wk.add_argument("--bus-url", default=None, help="use this NATS instead of bus.url")
    wk.add_argument("--grace", type=float, default=30.0,
                    help="on SIGTERM, seconds to let in-flight runs finish")
    wk.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus metrics on this port (0: any free port)")
    wk.add_argument("--metrics-host", default="127.0.0.1",
                    help="address for --metrics-port (0.0.0.0 in containers)")
    wk.set_defaults(func=cmd_worker)

    ag = sub.add_parser("agent", help="run one agent turn through the bus")
    common(ag)
    ag.add_argument("--message", "-m", required=True, help="the user message")
    ag.add_argument("--agent", default=None, help="agent id (default: the default agent)")
    ag.add_argument("--session-key", default=None,
                    help="session to continue (default: agent:<id>:main)")
    ag.add_argument("--extra-system-prompt", default=None)
    ag.add_argument("--json", action="store_true", help="print the final result as JSON")
    ag.add_argument("--bus-url", default=None, help="use this NATS instead of bus.url")
    ag.set_defaults(func=cmd_agent, log_level="warning")

    from .cluster import add_parser as add_cluster_parser

    add_cluster_parser(sub, common)

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate and print the effective config")
    common(check)
    check.set_defaults(func=cmd_config_check)
    return parser


def tune_gc() -> None:
    """Fewer garbage collections on the hot path.

    A request allocates a few hundred container objects (ASGI scopes, dicts of
    parsed JSON, pydantic models, futures): with CPython's default first-generation
    threshold (700) the collector ran every couple of requests and, under load,
    walked every long-lived object of the process in each full collection.
    ``gc.freeze()`` moves what start-up created (modules, config, app) out of the
    collector's sight, and a larger first-generation threshold makes collections
    rarer (memory stays bounded: reference counting frees almost everything;
    only cycles wait for a collection). What it buys is in docs/BENCHMARKS.md.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    tune_gc()
    try:
        code = args.func(args)
    except ConfigError as exc:
        print(f"clawbus: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
