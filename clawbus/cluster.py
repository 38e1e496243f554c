"""``clawbus cluster``: the scaled-out topology of ``compose.yaml`` as local processes.

- a 3-node NATS JetStream cluster (full-mesh routes, data in
  ``<state dir>/cluster/nats/n1..n3``, so sessions survive a restart);
- ``--gateways`` gateway processes (default 2) on ``gateway.port``,
  ``gateway.port + 1``, … (or ``--base-port``; 0 = random ports);
- ``--workers`` worker processes;

every one pointed at the comma-separated URL list of all nodes, so streams and
buckets get 3 replicas and every process fails over between nodes. Gateway URLs
are printed once everything is ready. One Ctrl-C or SIGTERM stops it all:
workers are drained first, then gateways, then NATS; a second one hurries
(SIGKILL). Every child dies with this process (:mod:`clawbus.children`), so none is
left behind even if this one is killed.

Like ``clawbus up``, it owns its state dir (:func:`clawbus.statedir.lock_state_dir`,
taken before anything starts; the NATS nodes hold it too): a second ``clawbus
cluster`` or ``clawbus up`` on the same state dir refuses to start. The nodes
fsync their store as ``bus.sync`` says.

A child that exits on its own is reported and the rest keeps running (kill a
worker or a NATS node to watch the cluster fail over); once no gateway is left
the whole cluster stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

from .config import ConfigError, Settings, check_gateway_startable
from .launch import gateway_command, load, worker_command
from .natsserver import (
    NatsServer,
    NatsServerError,
    NatsServerNotFound,
    cluster,
    wait_jetstream_ready,
)
from .statedir import StateDirBusy, StateDirLock, clear_running, lock_state_dir, write_running
from .watched import WatchedProcess, write_line

log = logging.getLogger("clawbus.cluster")

PREFIX = "clawbus cluster:"
GATEWAY_LISTENING = re.compile(r"clawbus gateway listening on (http://\S+)")
WORKER_READY = re.compile(r"worker (\S+) ready")
START_TIMEOUT = 60.0
GATEWAY_STOP_TIMEOUT = 10.0
NATS_STOP_TIMEOUT = 5.0

def _say(message: str) -> None:
    write_line(sys.stdout, f"{PREFIX} {message}\n")  # never mid-line into a child's line


class _Stop:
    """SIGINT/SIGTERM: the first asks for a clean stop, the next one for a quick one."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurry = threading.Event()

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.requested.set()


class _Child(WatchedProcess):
    """A gateway or worker process; its stdout and stderr are passed through line by
    line (to ours), watching for the line that says it is ready."""

    def __init__(self, role: str, index: int, cmd: list[str], ready: re.Pattern[str]) -> None:
        self.role = role
        self.index = index
        self.exit_reported = False
        # Its own process group: a terminal's Ctrl-C reaches only us; we stop
        # children in order. Nothing is kept: every line is passed through.
        super().__init__(cmd, name=f"{role} {index}", merge_stderr=False, echo=True,
                         ready=ready, keep=0, own_group=True)

    @property
    def ready_value(self) -> str | None:
        return None if self.ready_match is None else self.ready_match.group(1)


def _wait_all(children: Sequence[_Child], timeout: float, hurry: threading.Event) -> None:
    """Wait for children to exit; SIGKILL whoever is left after ``timeout`` or on hurry."""
    deadline = time.monotonic() + timeout
    while any(c.alive for c in children):
        if hurry.is_set() or time.monotonic() >= deadline:
            for child in children:
                if child.alive:
                    log.warning("%s (pid %d) did not stop in time: killing it", child.name,
                                child.pid)
                    child.signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    for child in children:
        child.popen.wait()
        child.join_output(timeout=2.0)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _connectable(url: str) -> str:
    """A URL to reach a gateway bound to a wildcard address from this machine."""
    for wildcard, local in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:"),
                            ("//:::", "//[::1]:")):
        url = url.replace(wildcard, local)
    return url


def _gateway_ports(settings: Settings, base_port: int | None, count: int) -> list[int]:
    base = settings.gateway.port if base_port is None else base_port
    if base == 0:
        return [0] * count
    ports = [base + i for i in range(count)]
    if ports[-1] > 65535:
        raise ConfigError(f"gateway ports {base}..{ports[-1]} go past 65535: "
                          "use a lower --base-port, or 0 for random ports")
    return ports


class _Cluster:
    def __init__(self, args: argparse.Namespace, settings: Settings, stop: _Stop,
                 lock: StateDirLock) -> None:
        self.args = args
        self.settings = settings
        self.stop = stop
        self.lock = lock
        self.servers: list[NatsServer] = []
        self.gateways: list[_Child] = []
        self.workers: list[_Child] = []
        self.recorded_running = False

    # ------------------------------------------------------------------ start

    def run(self) -> int:
        """Start everything, then supervise until asked to stop; the exit code."""
        ports = _gateway_ports(self.settings, self.args.base_port, self.args.gateways)
        store = self.settings.state_dir / "cluster" / "nats"
        store.mkdir(parents=True, exist_ok=True)
        self.servers = cluster(self.args.nats, store, cluster_name="clawbus",
                               sync_interval=self.settings.bus.sync_interval,
                               pass_fds=[self.lock.fd])
        for server in self.servers:
            _say(f"nats {server.name} (pid {server.pid}) on {server.url}, data in "
                 f"{server.store_dir}")
        bus_url = ",".join(server.url for server in self.servers)
        asyncio.run(wait_jetstream_ready(bus_url, timeout=30.0))
        _say(f"bus {bus_url}")
        if self.stop.requested.is_set():
            return 0

        for i, port in enumerate(ports, start=1):
            child = _Child("gateway", i, gateway_command(self.args, bus_url, port),
                           GATEWAY_LISTENING)
            self.gateways.append(child)
            _say(f"gateway {i} (pid {child.pid}) starting")
        worker_cmd = [*worker_command(self.args, bus_url), "--grace", str(self.args.grace)]
        for i in range(1, self.args.workers + 1):
            child = _Child("worker", i, worker_cmd, WORKER_READY)
            self.workers.append(child)
            _say(f"worker {i} (pid {child.pid}) starting")

        if not self._wait_ready([*self.gateways, *self.workers]):
            return 0 if self.stop.requested.is_set() else 1
        urls = [_connectable(str(g.ready_value)) for g in self.gateways]
        for gateway, url in zip(self.gateways, urls, strict=True):
            _say(f"gateway {gateway.index} (pid {gateway.pid}) listening on {url}")
        self.lock.record(urls)
        # `clawbus agent` / `gateway` / `worker` with bus.url null join this cluster.
        write_running(self.settings.state_dir,
                      {"bus_url": bus_url, "gateways": urls, "mode": "cluster"})
        self.recorded_running = True
        _say(f"ready: {_count(len(self.servers), 'NATS node')}, "
             f"{_count(len(self.gateways), 'gateway')}, {_count(len(self.workers), 'worker')}; "
             "Ctrl-C stops everything")
        return self._supervise()

    def _wait_ready(self, children: Sequence[_Child]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(c.ready.is_set() for c in children):
            if self.stop.requested.is_set():
                return False
            for child in children:
                if not child.alive and not child.ready.is_set():
                    child.join_output(timeout=2.0)
                    log.error("%s (pid %d) exited with code %s while starting", child.name,
                              child.pid, child.popen.returncode)
                    return False
            if time.monotonic() >= deadline:
                late = ", ".join(c.name for c in children if not c.ready.is_set())
                log.error("not ready within %gs: %s", START_TIMEOUT, late)
                return False
            self.stop.requested.wait(0.05)
        return True

    def _supervise(self) -> int:
        reported_nats: set[str | None] = set()
        while not self.stop.requested.wait(0.5):
            for child in [*self.gateways, *self.workers]:
                if not child.alive and not child.exit_reported:
                    child.exit_reported = True
                    log.warning("%s (pid %d) exited with code %s", child.name, child.pid,
                                child.popen.returncode)
            for server in self.servers:
                if not server.running and server.name not in reported_nats:
                    reported_nats.add(server.name)
                    log.warning("nats %s (pid %s) exited with code %s", server.name,
                                server.pid, server.returncode)
            if not any(g.alive for g in self.gateways):
                log.error("no gateway is left: stopping the cluster")
                return 1
        return 0

    # ------------------------------------------------------------------ stop

    def shutdown(self) -> None:
        """Workers (drained), then gateways, then NATS; idempotent, never raises."""
        hurry = self.stop.hurry
        if any(w.alive for w in self.workers):
            _say(f"stopping: draining {_count(sum(w.alive for w in self.workers), 'worker')} "
                 f"(up to {self.args.grace:g}s; Ctrl-C again to hurry)")
        for worker in self.workers:
            worker.terminate()
        _wait_all(self.workers, self.args.grace + 5.0, hurry)
        for gateway in self.gateways:
            gateway.terminate()
        _wait_all(self.gateways, GATEWAY_STOP_TIMEOUT, hurry)
        for server in reversed(self.servers):
            try:
                server.stop(timeout=0.0 if hurry.is_set() else NATS_STOP_TIMEOUT)
            except Exception:  # keep stopping the others
                log.exception("stopping nats %s", server.name)
        if self.recorded_running:
            clear_running(self.settings.state_dir, pid=os.getpid())
        if self.servers or self.gateways or self.workers:
            _say("stopped")


def cmd_cluster(args: argparse.Namespace) -> int:
    settings = load(args)
    check_gateway_startable(settings)
    try:
        lock = lock_state_dir(settings.state_dir, "clawbus cluster")  # before anything starts
    except StateDirBusy as exc:
        print(exc, file=sys.stderr)
        return 1
    with lock:
        return _cluster(args, settings, lock)


def _cluster(args: argparse.Namespace, settings: Settings, lock: StateDirLock) -> int:
    if not settings.gateway.http.endpoints.chat_completions.enabled:
        log.warning("gateway.http.endpoints.chatCompletions.enabled is false: "
                    "/v1/chat/completions answers 404")
    if settings.bus.url:
        log.warning("bus.url is ignored: clawbus cluster runs its own %d-node NATS cluster",
                    args.nats)
    stop = _Stop()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, stop.handler) for sig in handled}
    run = _Cluster(args, settings, stop, lock)
    try:
        return run.run()
    except (NatsServerNotFound, NatsServerError, TimeoutError) as exc:
        print(f"clawbus cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        run.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _port(text: str) -> int:
    value = _at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("not a port number")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``clawbus cluster`` on the top-level subparsers."""
    p = sub.add_parser(
        "cluster", help="3-node NATS cluster + gateways + workers on this machine",
        description="The scaled-out topology (as compose.yaml) as local processes: a 3-node "
                    "NATS JetStream cluster, --gateways gateways and --workers workers. "
                    "Ctrl-C stops everything.")
    common(p)
    p.add_argument("--gateways", type=_at_least(1), default=2, help="gateways (default 2)")
    p.add_argument("--workers", type=_at_least(0), default=2,
                   help="worker processes (default 2)")
    p.add_argument("--nats", type=_at_least(1), default=3, help="NATS nodes (default 3)")
    p.add_argument("--base-port", type=_port, default=None,
                   help="first gateway port, the next ones follow (default gateway.port; "
                        "0: random ports)")
    p.add_argument("--grace", type=float, default=30.0, help="worker drain seconds on stop")
    p.set_defaults(func=cmd_cluster)


__all__ = ["add_parser", "cmd_cluster"]

