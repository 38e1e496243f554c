"""Real nats-server processes: start/stop hygiene, orphans, and a 3-node cluster under faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamInfo

from clawbus.natsserver import (
    NatsServer,
    NatsServerError,
    Supervisor,
    cluster,
    find_nats_server,
    wait_jetstream_ready,
)
from clawbus.statedir import clear_running, pid_alive, read_running, write_running

T = TypeVar("T")


async def _ignore(_exc: Exception) -> None:
    return None


async def _connect(*urls: str) -> Client:
    return await nats.connect(
        list(urls),
        error_cb=_ignore,
        reconnect_time_wait=1,
        max_reconnect_attempts=-1,
        connect_timeout=2,
    )


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def _retry(make: Callable[[], Awaitable[T]], within: float, what: str) -> T:
    """Await ``make()`` until it stops raising NATS errors, within a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await make()
        except (nats.errors.Error, TimeoutError) as exc:
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {within}s: {what}: {exc!r}") from exc
            await asyncio.sleep(0.1)


def test_find_nats_server() -> None:
    path = Path(find_nats_server())
    assert path.is_file()
    assert os.access(path, os.X_OK)


async def test_server_starts_with_jetstream(nats_server: NatsServer) -> None:
    assert nats_server.running
    assert nats_server.url.startswith("nats://127.0.0.1:")
    assert nats_server.port > 0
    nc = await _connect(nats_server.url)
    try:
        js = nc.jetstream(timeout=5)
        await js.account_info()
        await js.add_stream(name="T", subjects=["t.>"])
        ack = await js.publish("t.one", b"hello")
        assert ack.stream == "T"
        assert ack.seq == 1
    finally:
        await nc.close()


async def test_two_servers_get_distinct_ports(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "a") as a, NatsServer(tmp_path / "b") as b:
        assert a.port != b.port
        assert a.pid != b.pid
        for server in (a, b):
            nc = await _connect(server.url)
            try:
                await nc.jetstream(timeout=5).account_info()
            finally:
                await nc.close()


def test_stop_is_idempotent_and_leaves_no_process(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "s").start()
    pid = server.pid
    assert pid is not None
    assert pid_alive(pid)
    server.stop()
    server.stop()
    server.kill()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.log_tail  # the last lines stay available for diagnostics


def test_restart_comes_back_on_same_port_and_store(tmp_path: Path) -> None:
    async def publish(url: str) -> None:
        nc = await _connect(url)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(name="R", subjects=["r.>"])
            await js.publish("r.x", b"kept")
        finally:
            await nc.close()

    async def count(url: str) -> int:
        nc = await _connect(url)
        try:
            info = await nc.jetstream(timeout=5).stream_info("R")
            return info.state.messages
        finally:
            await nc.close()

    server = NatsServer(tmp_path / "s")
    try:
        server.start()
        url, first_pid = server.url, server.pid
        asyncio.run(publish(url))
        server.kill()
        server.restart()
        assert server.url == url
        assert server.pid != first_pid
        assert asyncio.run(count(url)) == 1
    finally:
        server.stop()


def test_start_failure_reports_log_lines(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = NatsServer(tmp_path / "s", port=port)
        with pytest.raises(NatsServerError) as info:
            server.start()
    assert info.value.address_in_use
    assert str(port) in str(info.value)
    assert not server.running


_CHILD = """
import sys, time
from pathlib import Path
from clawbus.natsserver import NatsServer
server = NatsServer(Path(sys.argv[1])).start()
print(server.pid, flush=True)
while True:
    time.sleep(60)
"""


def test_server_dies_with_sigkilled_parent(tmp_path: Path) -> None:
    nats_pid: int | None = None
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "store")],
        cwd=Path(__file__).resolve().parents[1],  # the repo root, so that `bus` imports
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        try:
            assert parent.stdout is not None
            line = parent.stdout.readline()
            assert line.strip().isdigit(), f"child printed {line!r}"
            nats_pid = int(line)
            assert pid_alive(nats_pid)
            parent.send_signal(signal.SIGKILL)
            parent.wait(timeout=10)
            _wait_until(lambda: not pid_alive(nats_pid or 0), 10, "the orphaned nats-server to die")
        finally:
            if parent.poll() is None:
                parent.kill()
            if nats_pid is not None and pid_alive(nats_pid):
                os.kill(nats_pid, signal.SIGKILL)


def test_server_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits; servers are
    # forked from a long-lived spawner thread, so start() is safe from a short-lived thread.
    server = NatsServer(tmp_path / "s")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:
            errors.append(exc)

    try:
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        assert not errors
        with pytest.raises(TimeoutError):  # an observation window, not a synchronisation
            server.wait_for_log("Trapped", timeout=0.5)
        assert server.running
    finally:
        server.stop()


def _healthy_r3(info: StreamInfo) -> bool:
    cl = info.cluster
    if cl is None or not cl.leader or cl.replicas is None or len(cl.replicas) != 2:
        return False
    return all(peer.current and not peer.offline for peer in cl.replicas)


@pytest.mark.slow
async def test_cluster_survives_node_loss_and_node_rejoins(
    nats_cluster: list[NatsServer],
) -> None:
    by_name = {server.name: server for server in nats_cluster}
    assert len(by_name) == 3
    urls = [server.url for server in nats_cluster]
    for url in urls:
        await wait_jetstream_ready(url, timeout=20)

    nc = await _connect(*urls)
    try:
        js = nc.jetstream(timeout=2)
        await _retry(
            lambda: js.add_stream(name="FAULT", subjects=["fault.>"], num_replicas=3),
            20, "creating an R3 stream",
        )
        # A new R3 stream may still be electing its leader: retried like the rest.
        await _retry(lambda: js.publish("fault.a", b"1", headers={"Nats-Msg-Id": "1"}),
                     20, "publishing to the new stream")
        info = await _retry(lambda: js.stream_info("FAULT"), 10, "stream info")
        assert info.config.num_replicas == 3
        leader = info.cluster.leader if info.cluster else None
        assert leader in by_name

        # Kill the stream leader: the survivors elect a new one and keep accepting writes.
        victim = by_name[leader]
        victim.kill()
        assert not victim.running
        ack = await _retry(
            lambda: js.publish("fault.b", b"2", headers={"Nats-Msg-Id": "2"}),
            20, "publishing with one node down",
        )
        assert ack.seq == 2

        # The restarted node (same ports, same store dir) rejoins and catches up.
        victim.restart()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            info = await _retry(lambda: js.stream_info("FAULT"), 10, "stream info")
            if _healthy_r3(info):
                break
            assert loop.time() < deadline, f"replicas did not recover: {info.cluster}"
            await asyncio.sleep(0.1)
        assert info.cluster is not None
        names = {info.cluster.leader} | {p.name for p in info.cluster.replicas or []}
        assert names == set(by_name)
        assert info.state.messages == 2
    finally:
        await nc.close()


def test_running_file_round_trip_and_stale_pid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert read_running(state) is None

    write_running(state, {"busUrl": "nats://127.0.0.1:1", "gatewayUrl": "http://127.0.0.1:2"})
    info = read_running(state)
    assert info is not None
    assert info["pid"] == os.getpid()
    assert info["busUrl"] == "nats://127.0.0.1:1"

    clear_running(state, pid=os.getpid() + 1)  # someone else's record: left alone
    assert read_running(state) is not None
    clear_running(state)
    assert read_running(state) is None
    clear_running(state)  # idempotent

    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    write_running(state, {"pid": gone.pid, "busUrl": "nats://127.0.0.1:1"})
    assert (state / "running.json").exists()
    assert read_running(state) is None

    (state / "running.json").write_text("not json")
    assert read_running(state) is None


# --------------------------------------------------------------------------- bus.sync


def _jetstream_varz(server: NatsServer) -> dict[str, object]:
    """The server's JetStream config as its monitoring endpoint reports it."""
    line = server.wait_for_log(r"Starting http monitor on \S+:\d+", timeout=5)
    port = line.rsplit(":", 1)[1].strip()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as resp:
        config: dict[str, object] = json.load(resp)["jetstream"]["config"]
    return config


@pytest.mark.parametrize(("sync", "always", "interval_ns"), [
    (None, False, 120_000_000_000),  # nats-server's default: fsync every 2 minutes
    ("always", True, 120_000_000_000),
    ("10s", False, 10_000_000_000),
])
def test_sync_interval_reaches_the_server(tmp_path: Path, sync: str | None, always: bool,
                                          interval_ns: int) -> None:
    with NatsServer(tmp_path / "s", sync_interval=sync, extra_args=["-m", "-1"]) as server:
        config = _jetstream_varz(server)
        assert config.get("sync_always", False) is always
        assert config["sync_interval"] == interval_ns
        # It survives a restart (the config file is rewritten each time).
        server.kill()
        server.restart()
        assert _jetstream_varz(server).get("sync_always", False) is always


def test_sync_interval_is_checked() -> None:
    with pytest.raises(ValueError, match="sync_interval"):
        NatsServer("/nonexistent", sync_interval="sometimes")


# --------------------------------------------------------------------------- supervision


def test_supervisor_restarts_a_killed_server_on_its_port(tmp_path: Path) -> None:
    restarted: list[int | None] = []
    gave_up: list[NatsServerError] = []
    server = NatsServer(tmp_path / "s").start()
    supervisor = Supervisor(server, gave_up.append,
                            on_restart=lambda s: restarted.append(s.pid)).start()
    try:
        url, first = server.url, server.pid
        for _ in range(2):
            before = server.pid
            server.kill()  # not through stop(): the supervisor takes it for a crash
            _wait_until(lambda b=before: server.running and server.pid != b, 15,  # type: ignore[misc]
                        "the restart")
        assert server.url == url and server.pid != first
        _wait_until(lambda: len(restarted) == 2, 5, "the restart hook")
        assert supervisor.restarts == 2 and not gave_up
        asyncio.run(wait_jetstream_ready(url, timeout=10))
    finally:
        supervisor.stop()
        server.stop()
        supervisor.join(5)
    assert not server.running  # a stop is not a crash: not restarted


def test_supervisor_gives_up_after_three_failures(tmp_path: Path) -> None:
    gave_up: list[NatsServerError] = []
    server = NatsServer(tmp_path / "s").start()
    supervisor = Supervisor(server, gave_up.append, retry_delay=0.05).start()
    try:
        pid = server.pid
        assert pid is not None
        store = tmp_path / "s" / "jetstream"
        store.rename(store.with_name("moved"))
        store.write_text("not a directory")  # every restart fails
        server.kill()
        supervisor.join(30)
        assert len(gave_up) == 1 and supervisor.gave_up is gave_up[0]
        assert "storage directory is not a directory" in str(gave_up[0])
        assert not server.running
    finally:
        supervisor.stop()
        server.stop()


def test_one_node_cluster_is_a_plain_server(tmp_path: Path) -> None:
    (server,) = cluster(1, tmp_path)
    try:
        assert server.name == "n1" and server.cluster_name is None
        asyncio.run(wait_jetstream_ready(server.url, timeout=10))
    finally:
        server.stop()
