"""Processes for the benchmark: launching (pinned with ``taskset``), readiness,
stopping, and reading CPU time and memory of a process tree from ``/proc``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- /proc -------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields is not None else None  # starttime (field 22)


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields is not None else None


def descendants(root: int) -> list[int]:
    """``root`` and all its live descendants (by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [root] if _stat_fields(root) is not None else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return sorted(out)


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of ``pids`` (threads included), in seconds."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def clawbus_subcommand(words: Sequence[str]) -> str | None:
    """The subcommand of a clawbus command line (``up``, ``gateway``, ``worker``, …):
    the word after the ``clawbus`` script or after ``-m clawbus`` (``-m cli`` in
    checkouts from before the package took the product's name); None for anything else."""
    for i, word in enumerate(words[:-1]):
        module = i > 0 and words[i - 1] == "-m" and word in ("clawbus", "cli")
        if Path(word).name == "clawbus" or module:
            return words[i + 1]
    return None


def process_role(pid: int) -> str:
    """A short name for what a process is (``gateway``, ``worker``, ``nats-server``, …).

    ``clawbus up`` serves one gateway itself and, with ``--gateways N``, starts
    N − 1 more as ``python -m clawbus gateway …`` children: all of them are
    ``gateway``; its ``python -m clawbus worker …`` children are ``worker``.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    program = Path(words[0]).name if words else "?"
    if program.startswith("nats-server"):
        return "nats-server"
    subcommand = clawbus_subcommand(words)
    if subcommand == "worker":
        return "worker"
    if subcommand in ("up", "gateway"):
        return "gateway"
    if "bench.upstream" in words:
        return "upstream"
    if "bench.mcp_tool" in words:  # the tool-round scenario's MCP server (a worker's child)
        return "mcp-tool"
    for word in words[:3]:
        if Path(word).name == "litellm":
            return "litellm"
    return program


def cpu_by_role(pids: Iterable[int]) -> dict[str, float]:
    """CPU seconds of ``pids`` summed per :func:`process_role`."""
    out: dict[str, float] = {}
    for pid in pids:
        role = process_role(pid)
        out[role] = out.get(role, 0.0) + cpu_seconds([pid])
    return out


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of resident set sizes (shared pages counted once per process)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += int(fields[1]) * PAGE
    return total


def pss_bytes(pids: Iterable[int]) -> int | None:
    """Sum of proportional set sizes (shared pages split between sharers), if readable."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            return None
        match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
        if match is None:
            return None
        total += int(match.group(1)) * 1024
    return total


def command_names(pids: Iterable[int]) -> list[str]:
    names = []
    for pid in pids:
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def settle(pids_fn: Callable[[], Sequence[int]], *, below: float = 0.05, window: float = 0.3,
           timeout: float = 20.0) -> float:
    """Wait until the processes use less than ``below`` of a core over ``window`` s.

    Returns the last measured CPU share (the caller may record it when the
    deadline passed without settling).
    """
    deadline = time.monotonic() + timeout
    share = 1.0
    while time.monotonic() < deadline:
        pids = pids_fn()
        before = cpu_seconds(pids)
        time.sleep(window)
        share = (cpu_seconds(pids) - before) / window
        if share < below:
            break
    return share


# -- network helpers ---------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when the server cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, ValueError):
        return 0, b""


def http_post(url: str, body: bytes, headers: Mapping[str, str],
              timeout: float = 30.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, ValueError) as exc:
        return 0, str(exc).encode()


# -- processes ---------------------------------------------------------------

def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    """``cmd`` run under ``taskset -c cpus`` (children inherit the affinity)."""
    return ["taskset", "-c", cpus, *cmd] if cpus else list(cmd)


class Process:
    """A child process whose stdout+stderr go to a log file.

    The benchmark keeps this runner rather than :class:`clawbus.watched.WatchedProcess`
    (the line-watching runner of ``clawbus cluster`` and the tests) on purpose: the
    processes it starts are what it measures, so their output goes straight into a
    file by the kernel. With a pipe, a reader thread in this harness (pinned to the
    harness CPU beside the load generators and the fake upstream) would spend that
    CPU on every log line, and a harness slow to drain would block the measured
    process on its writes. The file also keeps the whole log of a run on disk for
    the problem-line scan and for reading afterwards. Readiness is therefore read
    from the file (:meth:`wait_for`) or asked over HTTP (:meth:`wait_until`).
    """

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
            start_new_session=True)
        self._known: dict[int, str] = {}  # pid -> start time, so a reused pid is never hit
        self.pids()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """The process and its live descendants (remembered for :meth:`stop`)."""
        pids = descendants(self.pid)
        for pid in pids:
            started = _start_time(pid)
            if started is not None:
                self._known.setdefault(pid, started)
        return pids

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first log line matching ``pattern``; raises if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) "
                                   f"before {pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {pattern!r} within {timeout:.0f} s:\n"
                                   f"{self.tail()}")
            time.sleep(0.05)

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) "
                                   f"before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not {what} within {timeout:.0f} s:\n"
                                   f"{self.tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the process stops its own children), then SIGKILL whatever is left.

        Only this process and the descendants seen for it are signalled, by pid.
        """
        self.pids()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        deadline = time.monotonic() + 5.0

        def still_ours() -> list[int]:
            return [pid for pid, started in self._known.items()
                    if _start_time(pid) == started and _state(pid) not in (None, "Z")]

        leftovers = still_ours()
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.1)
            leftovers = still_ours()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
