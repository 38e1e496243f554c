"""``clawbus up``: embedded NATS + gateway + workers from one command; one Ctrl-C
(SIGINT) stops everything and leaves no process behind."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import openai
import pytest

from clawbus.statedir import pid_alive, read_running
from tests.helpers import TOKEN, base_config
from tests.procs import LISTENING, WORKER_READY, Proc, wait_until, write_config

NATS_STARTED = re.compile(r"embedded nats-server (\d+) on (nats://\S+)")


def worker_pids(proc: Proc) -> set[int]:
    """Worker ids look like ``w-<host>-<pid>-<random>``."""
    return {int(m.group(1).split("-")[-2])
            for m in map(WORKER_READY.search, list(proc.lines)) if m}


@pytest.mark.slow
def test_up_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    config = write_config(tmp_path / "clawbus.json5", base_config(None))
    state = tmp_path / "state"
    up = Proc(["up", "--config", str(config), "--workers", "2", "--port", "0", "--grace", "3"],
              env={"CLAWBUS_STATE_DIR": str(state)}, name="up")
    try:
        nats_pid = int(up.wait_line(NATS_STARTED).group(1))
        url = up.wait_line(LISTENING).group(1)
        wait_until(lambda: len(worker_pids(up)) == 2, timeout=30)

        running = read_running(state)
        assert running is not None and running["bus_url"].startswith("nats://127.0.0.1:")

        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200)
        assert httpx.get(f"{url}/healthz").json() == {"ok": True, "status": "live"}
        with openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0) as c:
            reply = c.chat.completions.create(
                model="openclaw", messages=[{"role": "user", "content": "hello up"}])
        assert reply.choices[0].message.content == "hello up"

        up.signal(signal.SIGINT)
        assert up.popen.wait(timeout=30) == 0
        for pid in (nats_pid, *worker_pids(up)):
            wait_until(lambda p=pid: not pid_alive(p), timeout=10)  # type: ignore[misc]
        assert read_running(state) is None
    finally:
        up.stop()
