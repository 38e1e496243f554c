"""The state dir: who owns it, and the record of what runs there.

* **Ownership.** ``clawbus up`` and ``clawbus cluster`` own their state dir (its
  NATS store, its ``running.json``) through an exclusive ``flock`` on
  ``<state dir>/clawbus.lock`` (:func:`lock_state_dir`), taken before anything
  starts. The kernel releases it when the last process holding the lock file
  open dies, however it dies, so a SIGKILL leaves no stale lock. The embedded
  ``nats-server`` processes inherit the descriptor: the state dir stays owned
  until they are gone too, so a new owner never runs a second server on a store
  a dying one still writes. The file also says who the owner is (pid, command,
  gateway URLs) for the refusal message of a second one (:class:`StateDirBusy`).
* **Discovery.** The owner writes the address of its bus to
  ``<state dir>/running.json`` so that ``clawbus gateway``, ``clawbus worker``
  and ``clawbus agent`` started later on the same machine find it instead of
  starting a bus of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_FILE",
    "RUNNING_FILE",
    "StateDirBusy",
    "StateDirLock",
    "clear_running",
    "lock_state_dir",
    "pid_alive",
    "read_running",
    "write_running",
]

RUNNING_FILE = "running.json"
LOCK_FILE = "clawbus.lock"
# How long a new owner waits for the processes of a dead one (its nats-server,
# which holds the lock too, stopping on the SIGTERM its parent's death sent it).
DEAD_OWNER_WAIT = 15.0

def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (or it just exited): trust kill(0)
    state = stat.rpartition(")")[2].split()
    return not (state and state[0] in ("Z", "X"))


def write_running(state_dir: Path, info: Mapping[str, Any]) -> Path:
    """Record a running ``clawbus up`` (bus url, gateway url, ...) in ``state_dir/running.json``.

    ``pid`` defaults to the current process. The file is replaced atomically.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    data = {"pid": os.getpid(), **info}
    path = state_dir / RUNNING_FILE
    tmp = path.with_name(f".{RUNNING_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_running(state_dir: Path) -> dict[str, Any] | None:
    """What :func:`write_running` recorded, or None if absent, unreadable or its pid is gone."""
    path = Path(state_dir) / RUNNING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not pid_alive(pid):
        return None
    return data


def clear_running(state_dir: Path, pid: int | None = None) -> None:
    """Remove ``running.json``; with ``pid``, only if it records that pid."""
    path = Path(state_dir) / RUNNING_FILE
    if pid is not None:
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("pid")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != pid:
            return
    path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- ownership


class StateDirBusy(Exception):
    """Another process owns the state dir; ``str()`` is the message for the user."""

    def __init__(self, state_dir: Path, owner: Mapping[str, Any] | None,
                 note: str | None = None) -> None:
        self.state_dir = state_dir
        self.owner = dict(owner or {})
        super().__init__(describe_owner(self.owner, state_dir, note))


def describe_owner(owner: Mapping[str, Any], state_dir: Path, note: str | None = None) -> str:
    """``another clawbus up (pid N, http://host:port) owns <dir>``: ``starting`` in
    place of the URL while the owner has not said where it listens yet, ``note``
    in its place when given."""
    command = str(owner.get("command") or "clawbus up or clawbus cluster")
    urls = owner.get("urls")
    where = note or (", ".join(str(u) for u in urls) if isinstance(urls, list) and urls
                     else "starting")
    pid = owner.get("pid")
    who = f"pid {pid}, {where}" if isinstance(pid, int) else where
    return f"another {command} ({who}) owns {state_dir}"


class StateDirLock:
    """The held lock on a state dir (see the module doc). Closing the descriptor,
    here or by the process's death, releases it."""

    def __init__(self, state_dir: Path, fd: int, command: str) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self.fd = fd
        self.command = command
        self.record()

    def record(self, urls: Sequence[str] = ()) -> None:
        """Say who owns the dir (this pid, the command, its gateway URLs once known)."""
        data = json.dumps({"pid": os.getpid(), "command": self.command,
                           "urls": list(urls)}).encode() + b"\n"
        # Overwrite in place, then cut: a reader sees either the old content, the new
        # one, or (briefly) the new one followed by old bytes, which does not parse.
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def release(self) -> None:
        """Unlock now (the kernel does it anyway when every holder has exited)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _read_owner(path: Path, attempts: int = 20) -> dict[str, Any] | None:
    """The owner recorded in the lock file; retried briefly while it is being written."""
    for attempt in range(attempts):
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("pid"), int):
            return data
        if attempt < attempts - 1:
            time.sleep(0.025)  # the owner locked and is writing its record right now
    return None


def lock_state_dir(state_dir: Path, command: str, *,
                   dead_owner_wait: float = DEAD_OWNER_WAIT) -> StateDirLock:
    """Take the exclusive lock on ``state_dir`` for ``command`` ("clawbus up", ...).

    Raises :class:`StateDirBusy` at once if a live process owns it. If the
    recorded owner is dead but the lock is still held (its nats-server is still
    stopping), waits up to ``dead_owner_wait`` seconds for it to be released.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline: float | None = None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return StateDirLock(state_dir, fd, command)
            except BlockingIOError:
                pass
            owner = _read_owner(path)
            pid = None if owner is None else owner.get("pid")
            if not isinstance(pid, int) or pid_alive(pid):
                raise StateDirBusy(state_dir, owner)
            # The owner died; what holds the lock are its children, on their way out.
            now = time.monotonic()
            if deadline is None:
                deadline = now + dead_owner_wait
            elif now >= deadline:
                raise StateDirBusy(state_dir, owner,
                                   "exited, but its processes still hold the lock")
            time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise
