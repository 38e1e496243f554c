"""``wrk`` (Debian's package) as the non-streaming load generator.

One wrk thread (it shares the harness core with the fake upstream), a Lua script
(``wrk_post.lua``) for the POST body and a JSON summary printed by its ``done()``
hook. Latencies are wrk's own (microseconds, from request write to response end).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import orjson

from .procs import pinned

SCRIPT = Path(__file__).with_name("wrk_post.lua")


class WrkError(RuntimeError):
    pass


def ensure_wrk(*, install: bool = True) -> str:
    """The path of ``wrk``, installing Debian's package when missing and allowed."""
    found = shutil.which("wrk")
    if found:
        return found
    hint = "install it with: apt-get install -y wrk (Debian/Ubuntu)"
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise WrkError(f"wrk is not installed; {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("bench: wrk is missing; installing Debian's package (apt-get install -y wrk)",
          flush=True)
    if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env,
                      check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env, check=False)
    found = shutil.which("wrk")
    if not found:
        raise WrkError(f"could not install wrk; {hint}")
    return found


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).strip()
    first = text.splitlines()[0] if text else "wrk ?"
    return first.split(" [", 1)[0].replace("debian/", "")  # "wrk 4.1.0-3+b2"


def run_wrk(wrk: str, url: str, body: bytes, *, auth: str | None, connections: int,
            duration: float, cpus: str | None, max_requests: int | None = None,
            timeout_s: float = 10.0, sessions: int | None = None,
            session_prefix: str | None = None) -> dict[str, Any]:
    """One wrk run; its ``done()`` summary plus ``rps`` and ``duration_s``.

    With ``max_requests`` the run ends as soon as that many responses arrived
    (``duration`` is then only an upper bound). With ``sessions`` = N, requests go
    round robin to N sessions (``x-openclaw-session-key: <session_prefix><k>``,
    prefix ``bench-`` by default). A body holding ``@N@`` gets each request's number
    (1, 2, …) there.
    """
    env = {**os.environ, "BENCH_BODY": body.decode(), "BENCH_AUTH": auth or ""}
    if max_requests is not None:
        env["BENCH_MAX_REQUESTS"] = str(max_requests)
    if sessions:
        env["BENCH_SESSIONS"] = str(sessions)
    if session_prefix is not None:
        env["BENCH_SESSION_PREFIX"] = session_prefix
    cmd = pinned([wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
                  f"--timeout={max(1, round(timeout_s))}s", "-s", str(SCRIPT), url], cpus)
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          text=True) as proc:
        assert proc.stdout is not None
        stopped = threading.Event()

        def watchdog() -> None:
            if not stopped.wait(duration + timeout_s + 30) and proc.poll() is None:
                proc.kill()

        threading.Thread(target=watchdog, daemon=True).start()
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("BENCH_STOPPED") and proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # wrk's main thread otherwise sleeps -d s
        proc.wait()
        stopped.set()
    for line in lines:
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = orjson.loads(line[len("BENCH_JSON "):])
            seconds = result["duration_us"] / 1e6
            result["duration_s"] = seconds
            result["rps"] = result["requests"] / seconds if seconds > 0 else 0.0
            errors = result["errors"]
            result["error_count"] = sum(int(v) for v in errors.values())
            return result
    raise WrkError(f"wrk printed no summary (exit {proc.returncode}):\n" + "\n".join(lines[-20:]))
