"""``clawbus cluster``: a 3-node NATS JetStream cluster, two gateways and two workers
from one command, against a fake OpenAI upstream. A session continues across the
two gateways, streams and buckets get 3 replicas, and one SIGINT stops every
process it started."""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from pathlib import Path

import httpx
import nats
import openai
import orjson
import pytest

from bus import subjects
from clawbus.statedir import pid_alive, read_running
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import TOKEN, base_config
from tests.procs import Proc, wait_until, write_config

STARTED = re.compile(r"^clawbus cluster: (nats n\d+|gateway \d+|worker \d+) \(pid (\d+)\)")
GATEWAY = re.compile(r"^clawbus cluster: gateway (\d+) \(pid \d+\) listening on (http://\S+)")
BUS = re.compile(r"^clawbus cluster: bus (nats://\S+)")
READY = re.compile(r"^clawbus cluster: ready: 3 NATS nodes, 2 gateways, 2 workers")
STOPPED = re.compile(r"^clawbus cluster: stopped")
WORKER_STOPPED = re.compile(r"worker w-\S+ stopped")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30)


async def replicas(bus_url: str) -> dict[str, tuple[int, int]]:
    """Per stream (KV buckets are streams too): configured replicas, and the peers the
    stream's raft group actually has (the leader plus its followers)."""
    nc = await nats.connect(bus_url.split(","), allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=5)
        out = {}
        for name in (subjects.RUNS_STREAM, subjects.TX_STREAM,
                     f"KV_{subjects.LEASES_BUCKET}", f"KV_{subjects.WORKERS_BUCKET}"):
            info = await js.stream_info(name)
            assert info.cluster is not None
            out[name] = (info.config.num_replicas or 1, 1 + len(info.cluster.replicas or []))
        return out
    finally:
        await nc.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cluster_serves_through_both_gateways_and_stops_everything(
        tmp_path: Path, upstream: FakeOpenAI) -> None:
    config = write_config(tmp_path / "clawbus.json5", base_config(upstream))
    state = tmp_path / "state"
    proc = Proc(["cluster", "--config", str(config), "--workers", "2", "--base-port", "0",
                 "--grace", "3"], env={"CLAWBUS_STATE_DIR": str(state)}, name="cluster")
    try:
        proc.wait_line(READY, timeout=120)
        lines = list(proc.lines)
        pids = {m.group(1): int(m.group(2)) for m in map(STARTED.search, lines) if m}
        assert set(pids) == {"nats n1", "nats n2", "nats n3", "gateway 1", "gateway 2",
                             "worker 1", "worker 2"}
        urls = [m.group(2) for m in map(GATEWAY.search, lines) if m]
        assert len(urls) == 2 and urls[0] != urls[1]
        (bus_url,) = [m.group(1) for m in map(BUS.search, lines) if m]
        assert len(bus_url.split(",")) == 3
        for url in urls:
            wait_until(lambda u=url: httpx.get(f"{u}/readyz").status_code == 200,  # type: ignore[misc]
                       timeout=30, interval=0.1)
        running = read_running(state)
        assert running is not None
        assert running["bus_url"] == bus_url and running["gateways"] == urls

        # One session (the `user` field), continued across the two gateways.
        tag, user = uuid.uuid4().hex[:8], f"u-{uuid.uuid4().hex[:8]}"
        with client(urls[0]) as first, client(urls[1]) as second:
            reply = first.chat.completions.create(
                model="openclaw", user=user,
                messages=[{"role": "user", "content": f"first {tag}"}])
            assert reply.choices[0].message.content == f"echo: first {tag}"
            text = "".join(
                chunk.choices[0].delta.content or ""
                for chunk in second.chat.completions.create(
                    model="openclaw", user=user, stream=True,
                    messages=[{"role": "user", "content": f"second {tag}"}])
                if chunk.choices)
            assert text == f"echo: second {tag}"
            stateless = second.chat.completions.create(
                model="openclaw/beta", messages=[{"role": "user", "content": f"third {tag}"}])
            assert stateless.choices[0].message.content == f"echo: third {tag}"
        (rec,) = [r for r in upstream.requests
                  if f"second {tag}" in orjson.dumps(r.body).decode()]
        assert rec.body["messages"][1:] == [
            {"role": "user", "content": f"first {tag}"},
            {"role": "assistant", "content": f"echo: first {tag}"},
            {"role": "user", "content": f"second {tag}"},
        ]

        assert asyncio.run(replicas(bus_url)) == {
            name: (3, 3) for name in ("RUNS", "TX", "KV_LEASES", "KV_WORKERS")}

        proc.signal(signal.SIGINT)
        assert proc.popen.wait(timeout=60) == 0, proc.output()
        proc.wait_line(STOPPED, timeout=5)
        for name, pid in pids.items():
            wait_until(lambda p=pid: not pid_alive(p), timeout=10)  # type: ignore[misc]
            assert not pid_alive(pid), name
        assert read_running(state) is None
        # Both workers were drained (each logs "worker <id> stopped") after the stop began
        # and before the cluster reported everything stopped.
        lines = list(proc.lines)
        drain = next(i for i, ln in enumerate(lines) if "stopping: draining 2 workers" in ln)
        done = next(i for i, ln in enumerate(lines) if STOPPED.search(ln))
        stopped = [i for i, ln in enumerate(lines) if WORKER_STOPPED.search(ln)]
        assert len(stopped) == 2 and all(drain < i < done for i in stopped), "\n".join(lines)
    except BaseException:  # pytest-timeout's Failed included: show what the cluster said
        print(proc.output(400))
        raise
    finally:
        proc.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_children_die_with_a_killed_cluster(tmp_path: Path) -> None:
    """SIGKILL gives the parent no chance to stop anything: PR_SET_PDEATHSIG does it."""
    config = write_config(tmp_path / "clawbus.json5", base_config(None))
    proc = Proc(["cluster", "--config", str(config), "--gateways", "1", "--workers", "1",
                 "--base-port", "0", "--grace", "1"],
                env={"CLAWBUS_STATE_DIR": str(tmp_path / "state")}, name="cluster")
    try:
        proc.wait_line(re.compile(r"^clawbus cluster: ready: 3 NATS nodes, 1 gateway, "
                                  r"1 worker;"), timeout=120)
        pids = {m.group(1): int(m.group(2)) for m in map(STARTED.search, list(proc.lines)) if m}
        assert len(pids) == 5
        proc.kill()
        for name, pid in pids.items():
            wait_until(lambda p=pid: not pid_alive(p), timeout=15)  # type: ignore[misc]
            assert not pid_alive(pid), name
    finally:
        proc.stop()
