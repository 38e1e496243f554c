"""Real clawbus processes for end-to-end tests: gateways and workers started with
``python -m clawbus`` exactly as a user would, on free loopback ports.

Each process's output is drained by a thread (so pipes never fill) and kept for
diagnostics; readiness is read from the process's own log lines, never guessed
with sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

LISTENING = re.compile(r"clawbus gateway listening on (http://\S+)")
WORKER_READY = re.compile(r"worker (\S+) ready")
START_TIMEOUT = 30.0


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Config files are JSON5; plain JSON is valid JSON5."""
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
    return path


class Proc:
    """A child process whose combined output is collected line by line."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None,
                 name: str = "proc") -> None:
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "clawbus", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=full_env)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"{name}-log")
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_line(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT,
                  start: int = 0) -> re.Match[str]:
        """The first output line (from index ``start``) matching ``pattern``."""
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n"
                                       + self.output())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name}: no line matching {pattern.pattern!r}:\n"
                                       + self.output())
                self._cond.wait(min(remaining, 0.5))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._close()
        return code

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class Gateway(Proc):
    def __init__(self, config: Path, bus_url: str, *, env: dict[str, str] | None = None,
                 name: str = "gateway") -> None:
        super().__init__(["gateway", "--config", str(config), "--bus-url", bus_url,
                          "--port", "0", "--log-level", "info"], env=env, name=name)
        self.url = self.wait_line(LISTENING).group(1)


class Worker(Proc):
    def __init__(self, config: Path, bus_url: str, *, env: dict[str, str] | None = None,
                 grace: float = 10.0, name: str = "worker",
                 extra_args: Sequence[str] = ()) -> None:
        super().__init__(["worker", "--config", str(config), "--bus-url", bus_url,
                          "--grace", str(grace), "--log-level", "info", *extra_args],
                         env=env, name=name)
        self.worker_id = self.wait_line(WORKER_READY).group(1)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
               interval: float = 0.02) -> None:
    """Poll a condition that has no event to wait on, with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval)
