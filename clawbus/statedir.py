"""The state dir's record of a running ``clawbus up``.

``clawbus up`` writes the address of its bus to ``<state dir>/running.json`` so
that ``clawbus gateway``, ``clawbus worker`` and ``clawbus agent`` started later
on the same machine find it instead of starting a bus of their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RUNNING_FILE", "clear_running", "pid_alive", "read_running", "write_running"]

RUNNING_FILE = "running.json"

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
