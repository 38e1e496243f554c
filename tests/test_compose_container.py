"""``compose.yaml`` brought up for real through testcontainers' Compose support:
the image built from the Dockerfile, three NATS nodes, both gateways and the
workers, then one chat completion through the official ``openai`` SDK.

It needs a Docker engine and the ``docker compose`` CLI; where either is
missing it skips and says which (``tests/test_compose.py`` checks the same
files statically, without Docker). The stack runs under a project name of its
own, on free host ports, so it never touches a ``clawbus`` project of yours;
``down --volumes`` removes only what it created (the ``clawbus:local`` image
it builds stays).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.helpers import docker_engine_problem

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "compose-container-test-token"
GATEWAY_PORT = 18789  # inside the container (deploy/clawbus.json5)
READY_TIMEOUT = 120.0


def _compose_problem() -> str | None:
    """None when ``docker compose`` can run the stack here, else why not."""
    problem = docker_engine_problem()
    if problem is not None:
        return f"no Docker engine answers: {problem}"
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on PATH"
    out = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                         check=False, timeout=30)
    if out.returncode != 0:
        return f"`docker compose` does not run: {(out.stderr or out.stdout).strip()}"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _wait_ready(url: str) -> None:
    """Until the gateway's /readyz answers 200 (bus connected, a worker alive)."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/readyz", timeout=3)
            if resp.status_code == 200:
                return
            last = f"{resp.status_code} {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise TimeoutError(f"{url}/readyz not 200 within {READY_TIMEOUT:g} s: {last}")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first run builds the image (pip install inside)
def test_compose_stack_answers_a_chat_completion(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = _compose_problem()
    if problem is not None:
        pytest.skip(f"compose.yaml not brought up: {problem}")
    from testcontainers.compose import DockerCompose

    port_1, port_2 = _free_ports(2)
    # `docker compose` inherits these: a project (containers, network, volumes) of
    # its own, the token compose.yaml requires, and host ports that are free.
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", f"clawbus-test-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("OPENCLAW_GATEWAY_TOKEN", TOKEN)
    monkeypatch.setenv("CLAWBUS_PORT_1", str(port_1))
    monkeypatch.setenv("CLAWBUS_PORT_2", str(port_2))
    compose = DockerCompose(ROOT, compose_file_name="compose.yaml", build=True, wait=True)
    with compose:
        try:
            port = compose.get_service_port("gateway-1", GATEWAY_PORT)
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url)
            client = OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
            words = f"hello compose {uuid.uuid4().hex[:8]}"
            reply = client.chat.completions.create(
                model="openclaw", messages=[{"role": "user", "content": words}])
        except BaseException:
            with contextlib.suppress(Exception):
                stdout, stderr = compose.get_logs()
                print(f"--- docker compose logs ---\n{stdout[-8000:]}\n{stderr[-4000:]}")
            raise
    assert port == port_1
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == words  # deploy/clawbus.json5's echo model
    assert reply.choices[0].finish_reason == "stop"
