"""``clawbus up --gateways 2``: two gateway processes share one port (SO_REUSEPORT)."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from clawbus.statedir import pid_alive
from tests.helpers import TOKEN, base_config
from tests.procs import LISTENING, Proc, wait_until, write_config


@pytest.mark.slow
def test_two_gateway_processes_share_the_port(tmp_path: Path) -> None:
    config = write_config(tmp_path / "clawbus.json5", base_config(None))
    up = Proc(["up", "--config", str(config), "--workers", "1", "--gateways", "2",
               "--port", "0", "--grace", "3"],
              env={"CLAWBUS_STATE_DIR": str(tmp_path / "state")}, name="up")
    try:
        url = up.wait_line(LISTENING).group(1)
        second = up.wait_line(LISTENING, start=up.lines.index(
            next(ln for ln in up.lines if LISTENING.search(ln))) + 1).group(1)
        assert second == url  # the same port
        seen: dict[str, int] = {}

        def both_answer() -> bool:
            # New connections are spread by the kernel over both processes.
            with httpx.Client() as http:
                health = http.get(f"{url}/readyz").json()
            seen[health["gatewayId"]] = health["pid"]
            return len(seen) == 2

        wait_until(both_answer, timeout=30, interval=0.0)
        with httpx.Client(timeout=30) as http:
            for _ in range(6):
                resp = http.post(f"{url}/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Connection": "close"},
                                 json={"model": "openclaw",
                                       "messages": [{"role": "user", "content": "hi"}]})
                assert resp.status_code == 200, resp.text
        up.signal(signal.SIGINT)
        assert up.popen.wait(timeout=30) == 0
        for pid in seen.values():
            wait_until(lambda p=pid: not pid_alive(p))  # type: ignore[misc]
    finally:
        up.stop()
