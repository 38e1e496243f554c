"""State dir ownership: ``clawbus up`` and ``clawbus cluster`` hold an exclusive lock
on their state dir; a second one on the same dir refuses at once, starting nothing,
and the lock goes away with its owner (SIGKILL included), so the next one starts
normally and finds the sessions of the first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from clawbus.statedir import (
    LOCK_FILE,
    StateDirBusy,
    lock_state_dir,
    pid_alive,
    read_running,
)
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import base_config, sdk_turn, seen_by_upstream
from tests.procs import LISTENING, WORKER_READY, Proc, wait_until, write_config

NATS_STARTED = re.compile(r"embedded nats-server (\d+) on (nats://\S+)")
CLUSTER_READY = re.compile(r"^clawbus cluster: ready: 1 NATS node, 1 gateway, 0 workers")
CLUSTER_GATEWAY = re.compile(r"^clawbus cluster: gateway 1 \(pid \d+\) listening on (http://\S+)")


# --------------------------------------------------------------------------- the lock itself


def test_second_lock_is_refused_with_the_owner(tmp_path: Path) -> None:
    with lock_state_dir(tmp_path, "clawbus up") as lock:
        with pytest.raises(StateDirBusy) as info:
            lock_state_dir(tmp_path, "clawbus cluster")
        # Locked, no URL yet: the pid, and that it is starting.
        assert str(info.value) == (f"another clawbus up (pid {os.getpid()}, starting) owns "
                                   f"{tmp_path}")
        lock.record(["http://127.0.0.1:1234"])
        with pytest.raises(StateDirBusy) as info:
            lock_state_dir(tmp_path, "clawbus up")
        assert str(info.value) == (f"another clawbus up (pid {os.getpid()}, "
                                   f"http://127.0.0.1:1234) owns {tmp_path}")
    with lock_state_dir(tmp_path, "clawbus cluster") as again:  # released: free again
        again.record(["http://a:1", "http://b:2"])
        with pytest.raises(StateDirBusy) as info:
            lock_state_dir(tmp_path, "clawbus up")
        assert str(info.value) == (f"another clawbus cluster (pid {os.getpid()}, "
                                   f"http://a:1, http://b:2) owns {tmp_path}")


def test_lock_without_a_readable_record_is_still_refused(tmp_path: Path) -> None:
    with lock_state_dir(tmp_path, "clawbus up"):
        (tmp_path / LOCK_FILE).write_text("{not json")
        with pytest.raises(StateDirBusy) as info:
            lock_state_dir(tmp_path, "clawbus up")
    assert str(info.value) == (f"another clawbus up or clawbus cluster (starting) owns "
                               f"{tmp_path}")


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_held_by_the_children_of_a_dead_owner(tmp_path: Path) -> None:
    """The recorded owner is gone but its children (the nats-server) still hold the
    lock: the new owner waits for them, then says so if they never let go."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    (tmp_path / LOCK_FILE).write_text(orjson.dumps(
        {"pid": gone.pid, "command": "clawbus up", "urls": ["http://x:1"]}).decode())
    with subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / LOCK_FILE)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
            with pytest.raises(StateDirBusy) as info:
                lock_state_dir(tmp_path, "clawbus up", dead_owner_wait=0.3)
            assert str(info.value) == (f"another clawbus up (pid {gone.pid}, exited, but its "
                                       f"processes still hold the lock) owns {tmp_path}")
        finally:
            holder.kill()
    with lock_state_dir(tmp_path, "clawbus up"):  # the holder died: the lock went with it
        pass


def test_lock_is_not_inherited_by_ordinary_children(tmp_path: Path) -> None:
    """Close-on-exec: only the children it is passed to (the nats-server) hold it."""
    with lock_state_dir(tmp_path, "clawbus up") as lock:
        out = subprocess.run([sys.executable, "-c", f"import os; os.fstat({lock.fd})"],
                             capture_output=True, text=True, check=False, close_fds=False)
        assert out.returncode != 0 and "Bad file descriptor" in out.stderr


# --------------------------------------------------------------------------- real processes




def up_proc(config: Path, state: Path, name: str) -> Proc:
    return Proc(["up", "--config", str(config), "--workers", "1", "--port", "0", "--grace", "3"],
                env={"CLAWBUS_STATE_DIR": str(state)}, name=name)


def nats_servers_on(store: Path) -> list[int]:
    """Pids of the nats-server processes using this store dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"nats-server") and str(store).encode() in args:
            pids.append(int(entry.name))
    return pids


def holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    fds = Path(f"/proc/{pid}/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())


def assert_refused(proc: Proc, message: str) -> None:
    """Exited 1 at once with exactly ``message``, having started nothing."""
    assert proc.popen.wait(timeout=30) == 1, proc.output()
    proc.join_output()
    assert proc.lines == [message]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_second_up_refuses_and_the_next_one_after_a_kill_starts(
        tmp_path: Path, upstream: FakeOpenAI) -> None:
    config = write_config(tmp_path / "clawbus.json5", base_config(upstream))
    state = tmp_path / "state"
    tag, user = uuid.uuid4().hex[:8], f"u-{uuid.uuid4().hex[:8]}"
    first = up_proc(config, state, "up1")
    try:
        nats_pid = int(first.wait_line(NATS_STARTED).group(1))
        url = first.wait_line(LISTENING).group(1)
        worker_id = first.wait_line(WORKER_READY).group(1)
        worker_pid = int(worker_id.split("-")[-2])
        assert sdk_turn(url, user, f"one {tag}") == f"echo: one {tag}"
        # The embedded nats-server holds the lock too (it writes the store).
        assert holds(nats_pid, state / LOCK_FILE) and not holds(worker_pid, state / LOCK_FILE)
        record = (state / "running.json").read_bytes()

        owner = f"another clawbus up (pid {first.pid}, {url}) owns {state}"
        assert_refused(up_proc(config, state, "up2"), owner)
        # `clawbus cluster` refuses the same way.
        assert_refused(Proc(["cluster", "--config", str(config), "--nats", "1",
                             "--gateways", "1", "--workers", "0", "--base-port", "0"],
                            env={"CLAWBUS_STATE_DIR": str(state)}, name="cluster"), owner)
        # Nothing was started or touched: one nats-server on the store, the record as it was.
        assert nats_servers_on(state / "nats") == [nats_pid]
        assert (state / "running.json").read_bytes() == record

        # The first one kept serving.
        assert sdk_turn(url, user, f"two {tag}") == f"echo: two {tag}"
        assert seen_by_upstream(upstream, f"two {tag}")[:2] == [
            {"role": "user", "content": f"one {tag}"},
            {"role": "assistant", "content": f"echo: one {tag}"}]

        # SIGKILL: no chance to clean up; its children die with it (die-with-parent),
        # and the lock goes with the last of them. A new one starts at once on the dir.
        first.kill()
        third = up_proc(config, state, "up3")
        try:
            new_url = third.wait_line(LISTENING).group(1)
            assert not pid_alive(nats_pid)  # gone before the new one could take the lock
            wait_until(lambda: not pid_alive(worker_pid), timeout=15)
            running = read_running(state)
            assert running is not None and running["pid"] == third.pid
            assert running["gateways"] == [new_url]
            assert sdk_turn(new_url, user, f"three {tag}") == f"echo: three {tag}"
            assert seen_by_upstream(upstream, f"three {tag}") == [
                {"role": "user", "content": f"one {tag}"},
                {"role": "assistant", "content": f"echo: one {tag}"},
                {"role": "user", "content": f"two {tag}"},
                {"role": "assistant", "content": f"echo: two {tag}"},
                {"role": "user", "content": f"three {tag}"}]
            third.signal(signal.SIGINT)
            assert third.popen.wait(timeout=30) == 0, third.output()
        finally:
            third.stop()
    finally:
        first.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_up_refuses_a_state_dir_owned_by_a_cluster(tmp_path: Path) -> None:
    config = write_config(tmp_path / "clawbus.json5", base_config(None))
    state = tmp_path / "state"
    cluster = Proc(["cluster", "--config", str(config), "--nats", "1", "--gateways", "1",
                    "--workers", "0", "--base-port", "0", "--grace", "1"],
                   env={"CLAWBUS_STATE_DIR": str(state)}, name="cluster")
    try:
        cluster.wait_line(CLUSTER_READY, timeout=60)
        url = cluster.wait_line(CLUSTER_GATEWAY).group(1)
        owner = f"another clawbus cluster (pid {cluster.pid}, {url}) owns {state}"
        assert_refused(up_proc(config, state, "up"), owner)
        assert cluster.alive
        cluster.signal(signal.SIGINT)
        assert cluster.popen.wait(timeout=30) == 0, cluster.output()
    finally:
        cluster.stop()
