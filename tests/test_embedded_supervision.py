"""``clawbus up`` supervises its embedded nats-server: killed, it comes back on the
same port and store (gateways and workers reconnect by themselves, sessions are
kept); if it cannot come back, ``clawbus up`` stops everything and exits 1 with the
server's last log lines. And ``bus.sync`` reaches the embedded server."""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from clawbus.statedir import pid_alive, read_running
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import base_config, sdk_client, sdk_turn, seen_by_upstream
from tests.procs import LISTENING, WORKER_READY, Proc, wait_until, write_config

NATS_STARTED = re.compile(r"embedded nats-server (\d+) on (nats://\S+)")
RESTARTED = re.compile(r"embedded nats-server restarted \(restart (\d+)\): pid (\d+) on (\S+)")
RESTART_FAILED = re.compile(r"restarting the embedded nats-server failed")




def processes_mentioning(*needles: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains any of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(n in cmdline for n in needles) and pid_alive(int(entry.name)):
            found.append((int(entry.name), cmdline))
    return found


def start_up(tmp_path: Path, config: dict[str, object], *extra: str) -> tuple[Proc, Path]:
    state = tmp_path / "state"
    path = write_config(tmp_path / "clawbus.json5", config)
    proc = Proc(["up", "--config", str(path), "--port", "0", "--grace", "3", *extra],
                env={"CLAWBUS_STATE_DIR": str(state)}, name="up")
    return proc, state


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killed_nats_server_is_restarted_and_sessions_continue(
        tmp_path: Path, upstream: FakeOpenAI) -> None:
    # The queue timeout covers the workers' pull requests, lost with the old server
    # and asked again after a few seconds of silence (bus/pull.py).
    up, state = start_up(tmp_path, base_config(upstream, queueTimeoutSeconds=20),
                         "--workers", "2")
    try:
        started = up.wait_line(NATS_STARTED)
        nats_pid, bus_url = int(started.group(1)), started.group(2)
        url = up.wait_line(LISTENING).group(1)
        wait_until(lambda: sum(bool(WORKER_READY.search(ln)) for ln in up.lines) == 2,
                   timeout=30)
        tag, user = uuid.uuid4().hex[:8], f"u-{uuid.uuid4().hex[:8]}"
        assert sdk_turn(url, user, f"one {tag}") == f"echo: one {tag}"
        assert sdk_turn(url, user, f"two {tag}") == f"echo: two {tag}"

        mark = len(up.lines)
        os.kill(nats_pid, signal.SIGKILL)
        restart = up.wait_line(RESTARTED, timeout=30, start=mark)
        new_pid = int(restart.group(2))
        assert restart.group(3) == bus_url and new_pid != nats_pid  # same port, new process
        assert (read_running(state) or {}).get("bus_url") == bus_url

        # Later turns of the session succeed, through the same gateway and workers
        # (reconnected by themselves), and see the turns from before the kill. The
        # worker registry (a memory bucket) was recreated: the workers' heartbeats
        # land again, so the gateway takes them for alive.
        assert sdk_turn(url, user, f"three {tag}") == f"echo: three {tag}"
        assert seen_by_upstream(upstream, f"three {tag}") == [
            {"role": "user", "content": f"one {tag}"},
            {"role": "assistant", "content": f"echo: one {tag}"},
            {"role": "user", "content": f"two {tag}"},
            {"role": "assistant", "content": f"echo: two {tag}"},
            {"role": "user", "content": f"three {tag}"}]
        assert sdk_turn(url, user, f"four {tag}") == f"echo: four {tag}"
        assert len(seen_by_upstream(upstream, f"four {tag}")) == 7
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout=15)
        assert not [ln for ln in up.lines[mark:] if "heartbeat failed" in ln
                    and "no response from stream" not in ln]

        up.signal(signal.SIGINT)
        assert up.popen.wait(timeout=30) == 0, up.output()
        assert not pid_alive(new_pid)
    finally:
        up.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_nats_server_that_cannot_be_restarted_stops_everything(tmp_path: Path) -> None:
    up, state = start_up(tmp_path, base_config(None), "--workers", "1", "--gateways", "2")
    try:
        started = up.wait_line(NATS_STARTED)
        nats_pid, bus_url = int(started.group(1)), started.group(2)
        url = up.wait_line(LISTENING).group(1)
        up.wait_line(WORKER_READY)
        on_bus = f"{bus_url} "  # in the command lines of the worker and the second gateway
        wait_until(lambda: len(processes_mentioning(on_bus)) == 2, timeout=30)
        with sdk_client(url) as c:
            reply = c.chat.completions.create(
                model="openclaw", messages=[{"role": "user", "content": "before"}])
        assert reply.choices[0].message.content == "before"

        # Put a file where the server keeps its JetStream store, then kill it: every
        # restart fails ("storage directory is not a directory").
        store = state / "nats" / "jetstream"
        store.rename(store.with_name("jetstream.moved"))
        store.write_text("not a directory")
        os.kill(nats_pid, signal.SIGKILL)

        code = up.popen.wait(timeout=60)
        up.join_output()
        out = up.output(200)
        assert code == 1, out
        assert len([ln for ln in up.lines if RESTART_FAILED.search(ln)]) == 3, out
        assert "clawbus up: the embedded nats-server died and could not be restarted" in out
        assert "--- last nats-server log lines ---" in out
        assert "Can't start JetStream: storage directory is not a directory" in out
        # Nothing left behind: no nats-server on the store, no gateway or worker on the bus.
        assert processes_mentioning(on_bus, str(state / "nats")) == []
        assert read_running(state) is None
    finally:
        up.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bus_sync_always_reaches_the_embedded_server(tmp_path: Path) -> None:
    up, state = start_up(tmp_path, base_config(None, sync="always"), "--workers", "1")
    try:
        nats_pid = int(up.wait_line(NATS_STARTED).group(1))
        url = up.wait_line(LISTENING).group(1)
        up.wait_line(WORKER_READY)
        conf = state / "nats" / "nats-server.conf"
        cmdline = Path(f"/proc/{nats_pid}/cmdline").read_bytes().split(b"\0")
        assert [b"-c", str(conf).encode()] == cmdline[cmdline.index(b"-c"):][:2]
        assert "sync_interval: always" in conf.read_text()
        with sdk_client(url) as c:
            for i in range(3):
                reply = c.chat.completions.create(
                    model="openclaw", user="synced",
                    messages=[{"role": "user", "content": f"synced {i}"}])
                assert reply.choices[0].message.content == f"synced {i}"
        up.signal(signal.SIGINT)
        assert up.popen.wait(timeout=30) == 0, up.output()
    finally:
        up.stop()
