"""Real clawbus processes for end-to-end tests: gateways and workers started with
``python -m clawbus`` exactly as a user would, on free loopback ports.

They run on :class:`clawbus.watched.WatchedProcess`, the runner ``clawbus cluster``
uses too: each process's output is drained by a thread (so pipes never fill) and
kept for diagnostics; readiness is read from the process's own log lines, never
guessed with sleeps.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from clawbus.watched import WatchedProcess

LISTENING = re.compile(r"clawbus gateway listening on (http://\S+)")
WORKER_READY = re.compile(r"worker (\S+) ready")
START_TIMEOUT = 30.0


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Config files are JSON5; plain JSON is valid JSON5."""
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
    return path


class Proc(WatchedProcess):
    """``python -m clawbus <args>``; its combined output is kept, every line of it
    (so indices into :attr:`lines` are stable for ``wait_line(start=...)``)."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None,
                 name: str = "proc") -> None:
        super().__init__([sys.executable, "-m", "clawbus", *args], name=name, env=env,
                         keep=None)

    def _started(self, ready: re.Pattern[str]) -> re.Match[str]:
        """The line saying the process is ready; it is stopped if none comes."""
        try:
            return self.wait_line(ready, START_TIMEOUT)
        except BaseException:
            self.stop()
            raise


class Gateway(Proc):
    def __init__(self, config: Path, bus_url: str, *, env: dict[str, str] | None = None,
                 name: str = "gateway") -> None:
        super().__init__(["gateway", "--config", str(config), "--bus-url", bus_url,
                          "--port", "0", "--log-level", "info"], env=env, name=name)
        self.url = self._started(LISTENING).group(1)


class Worker(Proc):
    def __init__(self, config: Path, bus_url: str, *, env: dict[str, str] | None = None,
                 grace: float = 10.0, name: str = "worker",
                 extra_args: Sequence[str] = ()) -> None:
        super().__init__(["worker", "--config", str(config), "--bus-url", bus_url,
                          "--grace", str(grace), "--log-level", "info", *extra_args],
                         env=env, name=name)
        self.worker_id = self._started(WORKER_READY).group(1)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
               interval: float = 0.02) -> None:
    """Poll a condition that has no event to wait on, with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval)


@contextlib.contextmanager
def clawbus_up(config: Path, state_dir: Path, *, workers: int = 2, args: Sequence[str] = (),
               env: dict[str, str] | None = None) -> Iterator[tuple[Proc, str]]:
    """``clawbus up`` on a free port with ``workers`` workers: (the process, the
    gateway URL) once every worker is ready and ``/readyz`` says so; stopped with
    SIGINT (Ctrl-C) at the end."""
    up = Proc(["up", "--config", str(config), "--workers", str(workers), "--port", "0", *args],
              env={"CLAWBUS_STATE_DIR": str(state_dir), **(env or {})}, name="up")
    try:
        url = up.wait_line(LISTENING, START_TIMEOUT).group(1)
        wait_until(lambda: sum(1 for line in list(up.lines)
                               if WORKER_READY.search(line)) == workers, timeout=START_TIMEOUT)
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200,
                   timeout=START_TIMEOUT)
        yield up, url
    finally:
        up.signal(signal.SIGINT)
        up.stop()
