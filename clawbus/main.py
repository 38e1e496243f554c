"""The ``clawbus`` command line (SPEC §5).

- ``clawbus up``: embedded NATS (when ``bus.url`` is null) + the gateway + N
  worker processes; one Ctrl-C stops everything, workers first drained. It owns
  its state dir (an exclusive lock, :func:`clawbus.statedir.lock_state_dir`: a
  second one refuses at once) and supervises the embedded ``nats-server``
  (:class:`clawbus.natsserver.Supervisor`: restarted on the same port and store
  if it dies; if it cannot be, everything stops and ``clawbus up`` exits 1).
- ``clawbus gateway`` / ``clawbus worker``: one role each, for scaling out.
- ``clawbus config check``: validate a config and print it with secrets masked;
  with agent tools configured, also start each MCP server and list its tools.
- ``clawbus tools list``: each agent's tools as the model sees them (SPEC §9).

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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .children import spawn
from .config import ConfigError, Settings, check_gateway_startable, masked
from .launch import gateway_command, load, worker_command
from .logs import setup_logging
from .statedir import (
    StateDirBusy,
    StateDirLock,
    clear_running,
    lock_state_dir,
    read_running,
    write_running,
)

if TYPE_CHECKING:
    import uvicorn

    from .natsserver import NatsServer, NatsServerError

GC_GEN0_THRESHOLD = 20_000
# After giving up on the embedded nats-server: how long the orderly stop (gateway,
# then the other processes) may take before `clawbus up` kills them and exits.
GIVE_UP_STOP_TIMEOUT = 30.0
# Children of a `clawbus up` whose bus is gone: they cannot drain anything.
BUS_LOST_CHILD_TIMEOUT = 5.0
log = logging.getLogger("clawbus")

SYNC_NOT_EMBEDDED = ("bus.sync applies to the embedded nats-server only: with a bus URL, the "
                     "NATS servers' own jetstream sync_interval decides")


@contextlib.contextmanager
def _bus(settings: Settings, explicit_url: str | None, *, reuse_running: bool,
         on_give_up: Callable[[NatsServerError], None] | None = None,
         pass_fds: Sequence[int] = ()) -> Iterator[str]:
    """The bus URL to use, starting an embedded nats-server when none is configured.

    ``on_give_up``: supervise the embedded server (restart it when it dies) and
    call this if it cannot be restarted. ``pass_fds``: descriptors it inherits.
    """
    url = explicit_url or settings.bus.url
    if url:
        if settings.bus.url and not explicit_url and settings.bus.sync_interval:
            log.warning(SYNC_NOT_EMBEDDED)
        yield url
        return
    from .natsserver import NatsServer, Supervisor

    if reuse_running:
        running = read_running(settings.state_dir)
        if running and running.get("bus_url"):
            yield str(running["bus_url"])
            return
    store = settings.state_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    server = NatsServer(store_dir=store, sync_interval=settings.bus.sync_interval,
                        pass_fds=pass_fds)
    server.start()
    log.info("embedded nats-server %s on %s (data in %s, sync %s)", server.pid, server.url,
             store, settings.bus.sync)
    supervisor = None
    if on_give_up is not None:
        supervisor = Supervisor(server, on_give_up, logger=log,
                                on_restart=lambda s: _restore_bus(s, settings)).start()
    try:
        yield server.url
    finally:
        if supervisor is not None:
            supervisor.stop()
        server.stop()


def _restore_bus(server: NatsServer, settings: Settings) -> None:
    """After a restart of the embedded server: recreate what it lost. Streams on
    file are back with their data, but the worker registry is a memory bucket:
    until it exists again every worker heartbeat fails and gateways take every
    worker for dead."""
    import nats

    from bus.connection import ensure_bus

    from .natsserver import wait_jetstream_ready

    async def restore() -> None:
        await wait_jetstream_ready(server.url, timeout=10.0)
        nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=5,
                                name="clawbus up (restore)")
        try:
            await ensure_bus(nc, settings.bus, settings.session)
        finally:
            await nc.close()

    asyncio.run(restore())
    log.info("embedded nats-server: streams, consumer and buckets checked after the restart")


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


class _GatewayStopper:
    """Asks the gateway served in the main thread (by uvicorn) to shut down, from
    any thread, whether or not uvicorn has been set up yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self.requested = False

    def attach(self, server: uvicorn.Server) -> None:
        with self._lock:
            self._server = server
            if self.requested:
                server.should_exit = True

    def stop(self) -> None:
        with self._lock:
            self.requested = True
            if self._server is not None:
                self._server.should_exit = True  # uvicorn's main loop looks every 0.1 s


def _serve_gateway(settings: Settings, bus_url: str, port: int | None,
                   on_listening: Callable[[str], None] | None = None,
                   sock: socket.socket | None = None, *,
                   stopper: _GatewayStopper | None = None) -> None:
    import uvicorn

    from gateway.app import create_app

    app = create_app(settings, bus_url)
    # A WebSocket `agent` turn may carry images as data URIs: frames as large as
    # the HTTP endpoint's body limit in base64 (4/3) plus room for the JSON.
    max_body = settings.gateway.http.endpoints.chat_completions.max_body_bytes
    config = uvicorn.Config(
        app, host=settings.gateway.host,
        port=settings.gateway.port if port is None else port,
        loop="uvloop", http="httptools", ws="websockets-sansio", lifespan="on",
        log_level="warning", access_log=False, timeout_graceful_shutdown=5,
        ws_max_size=max(16 * 1024 * 1024, max_body * 4 // 3 + 64 * 1024),
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
                    on_listening(url)
                # Tests and scripts wait for this line to learn the (maybe random) port.
                print(f"clawbus gateway listening on {url}", flush=True)

    server = Server(config)
    if stopper is not None:
        stopper.attach(server)
    server.run(sockets=[sock] if sock is not None else None)


def _stop_children(children: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every child, wait up to ``timeout`` s for them all, then SIGKILL."""
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in children:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cmd_up(args: argparse.Namespace) -> int:
    settings = load(args)
    check_gateway_startable(settings)
    try:
        # Before anything starts: a second `clawbus up` (or `clawbus cluster`) on
        # this state dir must not start a nats-server on the same store.
        lock = lock_state_dir(settings.state_dir, "clawbus up")
    except StateDirBusy as exc:
        print(exc, file=sys.stderr)
        return 1
    from .natsserver import NatsServerError, NatsServerNotFound

    with lock:
        try:
            return _up(args, settings, lock)
        except (NatsServerError, NatsServerNotFound) as exc:  # the first start failed
            print(f"clawbus up: {exc}", file=sys.stderr)
            return 1


def _up(args: argparse.Namespace, settings: Settings, lock: StateDirLock) -> int:
    if not settings.gateway.http.endpoints.chat_completions.enabled:
        log.warning("gateway.http.endpoints.chatCompletions.enabled is false: "
                    "/v1/chat/completions answers 404")
    if (args.bus_url or settings.bus.url) and settings.bus.sync_interval:
        log.warning(SYNC_NOT_EMBEDDED)
    state_dir = settings.state_dir
    gateway = _GatewayStopper()
    children: list[subprocess.Popen[bytes]] = []
    lost: list[NatsServerError] = []
    stopped = threading.Event()

    def give_up(error: NatsServerError) -> None:
        # On the supervisor's thread: the main thread stops the gateway, then the
        # rest, and exits 1. Should that not happen in time (a gateway still
        # starting, waiting for the bus that is gone), stop everything from here.
        lost.append(error)
        gateway.stop()
        if stopped.wait(GIVE_UP_STOP_TIMEOUT):
            return
        log.error("clawbus up did not stop within %gs of losing its bus: killing it",
                  GIVE_UP_STOP_TIMEOUT)
        _report_bus_lost(error)
        _stop_children(children, 0.0)
        clear_running(state_dir, pid=os.getpid())
        os._exit(1)

    with contextlib.ExitStack() as stack:
        stack.callback(stopped.set)
        bus_url = stack.enter_context(_bus(settings, args.bus_url, reuse_running=False,
                                           on_give_up=give_up, pass_fds=[lock.fd]))
        try:
            # Own process groups: a terminal's Ctrl-C reaches only us; we stop them in order.
            children += [spawn(worker_command(args, bus_url), process_group=0)
                         for _ in range(args.workers)]
            sock = None
            port = settings.gateway.port if args.port is None else args.port
            if args.gateways > 1:
                # Extra gateway processes share this port (SO_REUSEPORT); with port 0
                # they all use the one the first socket was given.
                sock = reuse_port_socket(settings.gateway.host, port)
                port = sock.getsockname()[1]
                children += [spawn(gateway_command(args, bus_url, port, reuse_port=True),
                                   process_group=0)
                             for _ in range(args.gateways - 1)]
            running = {"bus_url": bus_url, "pid": os.getpid(), "mode": "up"}
            write_running(state_dir, running)

            def listening(url: str) -> None:
                lock.record([url])
                write_running(state_dir, {**running, "gateways": [url]})

            if not lost:
                _serve_gateway(settings, bus_url, port, listening, sock, stopper=gateway)
        finally:
            clear_running(state_dir, pid=os.getpid())
            _stop_children(children, BUS_LOST_CHILD_TIMEOUT if lost else args.grace + 5)
    if lost:
        _report_bus_lost(lost[0])
        return 1
    return 0


def _report_bus_lost(error: NatsServerError) -> None:
    print(f"clawbus up: the embedded nats-server died and could not be restarted, "
          f"stopping: {error}", file=sys.stderr, flush=True)


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
    from .telemetry import plan

    settings = load(args)
    tracing = plan(settings, os.environ, "gateway")  # (ConfigError: a bad OTEL_* variable)
    print(json.dumps(masked(settings), indent=2))
    if tracing is not None:  # (off: stderr stays as it was, empty for a good file)
        print(tracing.describe(), file=sys.stderr)
    code = 0
    try:
        check_gateway_startable(settings)
    except ConfigError as exc:
        print(f"warning: a gateway would not start: {exc}", file=sys.stderr)
        code = 1
    agents = [settings.agent(agent_id) for agent_id in settings.agent_ids]
    if any(agent is not None and settings.agent_tools(agent).mcp_servers for agent in agents):
        code = max(code, _check_mcp_servers(settings))
    return code


def _check_mcp_servers(settings: Settings) -> int:
    """Start every configured MCP server once and list its tools (on stderr:
    stdout holds the config)."""
    from workers.mcp.listing import list_tools, status_line

    _quiet_mcp_log()
    listing = asyncio.run(list_tools(settings, os.environ, settings.agent_ids))
    for status in listing.servers:
        print(status_line(status), file=sys.stderr)
    return 1 if listing.failures else 0


def _quiet_mcp_log() -> None:
    # A one-shot command reports failed servers itself; the workers' warning (which
    # promises a retry) would only repeat it.
    logging.getLogger("clawbus.mcp").setLevel(logging.ERROR)


def cmd_tools_list(args: argparse.Namespace) -> int:
    from workers.mcp.listing import as_json, list_tools, render

    settings = load(args)
    agent_ids = settings.agent_ids
    if args.agent is not None:
        agent = settings.agent(args.agent)
        if agent is None:
            print(f"clawbus tools list: unknown agent {args.agent!r} (agents: "
                  f"{', '.join(agent_ids)})", file=sys.stderr)
            return 2
        agent_ids = [agent.id]
    _quiet_mcp_log()
    listing = asyncio.run(list_tools(settings, os.environ, agent_ids))
    print(json.dumps(as_json(listing), indent=2) if args.json else render(listing))
    return 1 if listing.failures else 0


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

    tools = sub.add_parser("tools", help="agent tools (MCP servers)")
    tools_sub = tools.add_subparsers(dest="tools_command", required=True)
    tools_list = tools_sub.add_parser(
        "list", help="start the MCP servers and print each agent's tools as the model sees "
                     "them (exit 1 if a server fails to start)")
    common(tools_list)
    tools_list.add_argument("--agent", default=None, help="only this agent")
    tools_list.add_argument("--json", action="store_true",
                            help="print JSON: agents with their tools, failed servers")
    tools_list.set_defaults(func=cmd_tools_list, log_level="warning")
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
