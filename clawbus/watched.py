"""A child process whose output is read line by line: the one process runner of
``clawbus cluster`` (gateways and workers, their output passed through) and of
the end-to-end tests (``tests/procs.py``).

Each of the child's pipes is drained by a thread of its own, so a pipe never
fills and the child never blocks on a write. Every line is

* optionally echoed to our stdout (or stderr, for the child's stderr), one whole
  line at a time under a lock that :func:`write_line` shares, so lines of
  different children never interleave mid-line;
* checked against a ``ready`` pattern, whose first match sets :attr:`ready`
  (``clawbus cluster`` watches many children without blocking on any one);
* kept, all of them or the last ``keep``, for :meth:`wait_line` and for the
  output tails that errors carry.

The child is started with :func:`clawbus.children.spawn`, so it dies with this
process even if this one is killed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TextIO

from .children import spawn

__all__ = ["WatchedProcess", "write_line"]

_output_lock = threading.Lock()


def write_line(stream: TextIO, text: str) -> None:
    """Write ``text`` (one or more whole lines) and flush, under the lock every
    echoing :class:`WatchedProcess` holds for its lines; a stream that went away
    is ignored."""
    with _output_lock, contextlib.suppress(OSError, ValueError):
        stream.write(text)
        stream.flush()


class WatchedProcess:
    """A child process whose stdout and stderr are read line by line.

    ``merge_stderr`` sends the child's stderr into the same pipe as its stdout
    (one ordered stream of lines); otherwise each has its own pipe and, with
    ``echo``, goes to our own stderr. ``keep=None`` keeps every line (indices
    into :attr:`lines` stay valid for ``wait_line(start=...)``); a number keeps
    only the last that many. ``own_group`` starts the child in a process group
    of its own, so that a terminal's Ctrl-C reaches only us and we stop it in
    order.
    """

    def __init__(self, args: Sequence[str], *, name: str,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                 merge_stderr: bool = True, echo: bool = False,
                 ready: re.Pattern[str] | None = None, keep: int | None = 500,
                 own_group: bool = False) -> None:
        self.name = name
        self.ready = threading.Event()
        self.ready_match: re.Match[str] | None = None
        self._ready_re = ready
        self._cond = threading.Condition()
        self._lines: deque[str] = deque(maxlen=keep)
        self._seen = 0  # lines read so far, kept or not
        popen_extra: dict[str, object] = {"process_group": 0} if own_group else {}
        self.popen = spawn(
            list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
            **popen_extra)
        pipes: list[tuple[IO[bytes], TextIO | None, str]] = []
        assert self.popen.stdout is not None
        pipes.append((self.popen.stdout, sys.stdout if echo else None, "stdout"))
        if not merge_stderr:
            assert self.popen.stderr is not None
            pipes.append((self.popen.stderr, sys.stderr if echo else None, "stderr"))
        self._open_pipes = len(pipes)
        self._pumps = [threading.Thread(target=self._pump, args=(source, sink),
                                        name=f"{name}-{what}", daemon=True)
                       for source, sink, what in pipes]
        for pump in self._pumps:
            pump.start()

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def lines(self) -> list[str]:
        """The kept output lines (a copy), without their line ends."""
        with self._cond:
            return list(self._lines)

    def output(self, last: int = 60) -> str:
        """The last ``last`` kept lines, for diagnostics."""
        with self._cond:
            return "\n".join(list(self._lines)[-last:])

    # ------------------------------------------------------------------ reading

    def _pump(self, source: IO[bytes], sink: TextIO | None) -> None:
        try:
            with contextlib.suppress(OSError, ValueError):  # the pipe was closed under us
                for raw in source:
                    line = raw.decode("utf-8", "replace")
                    if sink is not None:
                        write_line(sink, line if line.endswith("\n") else line + "\n")
                    self._add(line.rstrip("\r\n"))
        finally:
            with contextlib.suppress(OSError):
                source.close()
            with self._cond:
                self._open_pipes -= 1
                self._cond.notify_all()

    def _add(self, line: str) -> None:
        with self._cond:
            if self._ready_re is not None and self.ready_match is None:
                self.ready_match = self._ready_re.search(line)
                if self.ready_match is not None:
                    self.ready.set()
            self._lines.append(line)
            self._seen += 1
            self._cond.notify_all()

    def wait_line(self, pattern: re.Pattern[str], timeout: float = 30.0,
                  start: int = 0) -> re.Match[str]:
        """The first output line (counting from line ``start``) matching ``pattern``.

        Raises RuntimeError if the child exits and its output ends first,
        TimeoutError after ``timeout`` seconds; both carry the output's last lines.
        """
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                first = self._seen - len(self._lines)  # index of the oldest kept line
                for line in itertools.islice(self._lines, max(0, seen - first), None):
                    match = pattern.search(line)
                    if match:
                        return match
                seen = self._seen
                if self._open_pipes == 0 and self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n"
                                       + self.output())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name}: no line matching {pattern.pattern!r}:\n"
                                       + self.output())
                self._cond.wait(min(remaining, 0.5))

    # ------------------------------------------------------------------ stopping

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the child is still running."""
        with contextlib.suppress(ProcessLookupError):
            if self.popen.poll() is None:
                self.popen.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, wait for the exit and the end of its output."""
        self.signal(signal.SIGKILL)
        self.popen.wait()
        self.join_output()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit code, once its output ended."""
        self.terminate()
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self.join_output()
        return code

    def join_output(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` s per pipe) until the readers have seen the end
        of the output; a pipe a grandchild still holds open is left to its daemon
        reader."""
        for pump in self._pumps:
            pump.join(timeout=timeout)
