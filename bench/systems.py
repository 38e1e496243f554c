"""The systems a benchmark round measures, all behind one small interface.

* :class:`UpstreamAlone` — the fake upstream itself (the baseline: what the load
  generators and the upstream cost without anything in between);
* :class:`Clawbus` — ``clawbus up`` (embedded nats-server, G gateway processes
  sharing the port via SO_REUSEPORT, N workers), every process on the given CPUs
  (``taskset`` on ``up``; children inherit it);
* :class:`LiteLLM` — LiteLLM's proxy from its own venv (``bench/.venvs/litellm``,
  installed by the harness, never a project dependency), on the given CPUs.

Every system routes the model names of the fake upstream (``fake-t<N>-d<MS>``, see
:mod:`bench.upstream`) to it, so one upstream serves every scenario.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from . import mcp_tool
from .procs import Process, free_port, http_get, http_post, pinned

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / "bench" / ".venvs"
CLAWBUS_TOKEN = "bench-token"
LITELLM_KEY = "sk-bench-master"
UPSTREAM_KEY = "sk-bench-upstream"
START_TIMEOUT = 120.0
_STARTS = itertools.count(1)  # unique state/log directory per system start

# Every reply shape a scenario uses (tokens, delay in ms).
SHAPES: tuple[tuple[int, float], ...] = ((32, 0.0), (32, 20.0), (20, 500.0))
# The hot-session agent: 32-token replies, every upstream request logged
# (bench/upstream.py: the `-log` model suffix, read back from GET /bench/log).
HOT_AGENT = "hot"
HOT_UPSTREAM_MODEL = "fake-t32-d0-log"
# The same with a paced model (1 ms per token, ~32 ms a turn): with an instant
# upstream the one core is never idle and the gap between turns is simply all the
# CPU a turn costs; with a model that takes time, work that need not come
# between two turns (the gateway answering the last, a client queueing the next)
# overlaps the model's, and the gap shows the hand-off itself.
HOT_PACED_AGENT = "hot-paced"
HOT_PACED_UPSTREAM_MODEL = "fake-t32-d1-log"


def tools_agent(rounds: int) -> str:
    """The agent whose model asks for ``rounds`` rounds of one tool call."""
    return f"tools{rounds}"


def tools_upstream_model(rounds: int) -> str:
    return f"fake-t32-d0-tools{rounds}-log"


def upstream_model(tokens: int, delay_ms: float) -> str:
    return f"fake-t{tokens}-d{delay_ms:g}"


class UpstreamProcess:
    """The fake upstream (``python -m bench.upstream``) as a pinned child process."""

    def __init__(self, logs: Path, cpus: str | None) -> None:
        self.logs = logs
        self.cpus = cpus
        self.restarts = 0
        self.proc = self._start(0)
        self.url = self.proc.wait_for(r"listening on (http://\S+)", 30.0).group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def _start(self, port: int) -> Process:
        name = "upstream" if not self.restarts else f"upstream-restart{self.restarts}"
        return Process("upstream", pinned(
            [sys.executable, "-m", "bench.upstream", "--port", str(port)], self.cpus),
            self.logs / f"{name}.log", cwd=ROOT)

    def pids(self) -> list[int]:
        return self.proc.pids()

    def ensure_alive(self) -> str | None:
        """Restart the upstream on its port if it has exited; then say what happened."""
        if self.proc.alive():
            return None
        what = (f"the fake upstream had exited (code {self.proc.popen.returncode}); "
                f"its log ends: {self.proc.tail(5)!r}; restarted on the same port")
        self.proc.stop()
        self.restarts += 1
        self.proc = self._start(self.port)
        self.proc.wait_for(r"listening on (http://\S+)", 30.0)
        return what

    def stop(self) -> None:
        self.proc.stop()


class System(ABC):
    key: str
    label: str
    auth: str | None = None

    @property
    @abstractmethod
    def base_url(self) -> str:
        """``http://host:port`` of the system's OpenAI-compatible server."""

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    @abstractmethod
    def model(self, tokens: int, delay_ms: float) -> str:
        """The client-side ``model`` that makes the upstream reply with this shape."""

    @abstractmethod
    def pids(self) -> list[int]:
        """Every process of the system (for CPU time and memory)."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Start the system and return once it serves requests."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop every process of the system."""

    def log_problems(self) -> list[str]:
        """Warning/error lines the system logged (for the report)."""
        return []

    def warm(self) -> None:
        """A non-streaming and a streaming request, so lazy set-up is not measured."""
        headers = {"Authorization": f"Bearer {self.auth}"} if self.auth else {}
        for stream in (False, True):
            body = orjson.dumps({"model": self.model(*SHAPES[0]), "stream": stream,
                                 "messages": [{"role": "user", "content": "warm up"}]})
            status, text = http_post(self.chat_url, body, headers)
            if status != 200:
                raise RuntimeError(f"{self.label}: warm-up request failed with {status}: "
                                   f"{text[:300]!r}")


class UpstreamAlone(System):
    key = "upstream"
    label = "upstream alone"

    def __init__(self, upstream: UpstreamProcess) -> None:
        self.upstream = upstream

    @property
    def base_url(self) -> str:
        return self.upstream.url

    def model(self, tokens: int, delay_ms: float) -> str:
        return upstream_model(tokens, delay_ms)

    def pids(self) -> list[int]:
        return self.upstream.pids()


def _problem_lines(text: str, words: tuple[str, ...]) -> list[str]:
    return [line for line in text.splitlines() if any(w in line for w in words)]


class ProcessSystem(System):
    """A system run as one process tree started by the harness (``self.proc``)."""

    proc: Process | None = None
    # Log-line markers worth reporting.
    problem_markers: tuple[str, ...] = ("ERROR", "Traceback")

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log_problems(self) -> list[str]:
        if self.proc is None:
            return []
        return _problem_lines(self.proc.log_text(), self.problem_markers)


class Clawbus(ProcessSystem):
    key = "clawbus"
    auth = CLAWBUS_TOKEN
    problem_markers = ("WARNING", "ERROR", "Traceback", "warning", "error")

    def __init__(self, upstream_url: str, workdir: Path, logs: Path, *, workers: int,
                 cpus: str | None, gateways: int = 1, label: str | None = None,
                 max_concurrent: int = 4096, source: Path | None = None,
                 shapes: Sequence[tuple[int, float]] = (), bus_sync: str | None = None,
                 tool_rounds: Sequence[int] = (),
                 env: Mapping[str, str] | None = None) -> None:
        self.upstream_url = upstream_url
        # Agents with an MCP tool (bench/mcp_tool.py), one per number of tool rounds
        # the model asks for. Only when asked: each worker then runs the tool's
        # server as a child process (more memory, a process more to account for).
        self.tool_rounds = tuple(dict.fromkeys(tool_rounds))
        # Extra environment for its processes (e.g. OTEL_* to trace them).
        self.env = dict(env or {})
        # `bus.sync` of the embedded nats-server (None: not in the config, its default).
        self.bus_sync = bus_sync
        # Reply shapes (tokens, delay) it has an agent for: the benchmark's, and more.
        self.shapes = tuple(dict.fromkeys((*SHAPES, *shapes)))
        self.workdir = workdir
        self.logs = logs
        self.workers = workers
        self.gateways = gateways
        self.gateway_pids: set[int] = set()  # seen in /readyz answers
        self.cpus = cpus
        self.max_concurrent = max_concurrent
        # Another checkout of clawbus to run instead of the installed one (A/B runs).
        self.source = source
        self.label = label or "clawbus"
        self.proc: Process | None = None
        self._url = ""

    def config(self) -> dict[str, Any]:
        agents: list[dict[str, Any]] = [
            {"id": f"t{t}-d{d:g}", "model": f"bench/{upstream_model(t, d)}"}
            for t, d in self.shapes]
        agents[0]["default"] = True
        agents.append({"id": HOT_AGENT, "model": f"bench/{HOT_UPSTREAM_MODEL}"})
        agents.append({"id": HOT_PACED_AGENT, "model": f"bench/{HOT_PACED_UPSTREAM_MODEL}"})
        for rounds in self.tool_rounds:
            agents.append({
                "id": tools_agent(rounds), "model": f"bench/{tools_upstream_model(rounds)}",
                "tools": {"maxRounds": rounds + 1, "mcpServers": {
                    "bench": {"command": mcp_tool.command(), "cwd": str(ROOT)}}}})
        return {
            "gateway": {"bind": "loopback", "auth": {"mode": "token", "token": CLAWBUS_TOKEN},
                        "http": {"endpoints": {"chatCompletions": {"enabled": True}}}},
            "agents": {"defaults": {"model": f"bench/{upstream_model(*SHAPES[0])}",
                                    "maxConcurrent": self.max_concurrent,
                                    "timeoutSeconds": 300},
                       "list": agents},
            "models": {"providers": {"bench": {
                "api": "openai-completions", "baseUrl": f"{self.upstream_url}/v1",
                "apiKey": UPSTREAM_KEY, "timeoutSeconds": 120}}},
            "bus": {"url": None, **({"sync": self.bus_sync} if self.bus_sync else {})},
        }

    @property
    def base_url(self) -> str:
        return self._url

    def model(self, tokens: int, delay_ms: float) -> str:
        return f"openclaw/t{tokens}-d{delay_ms:g}"

    def start(self) -> None:
        run_dir = self.workdir / f"{self.label.replace(' ', '-')}-{next(_STARTS)}"
        state = run_dir / "state"
        state.mkdir(parents=True, exist_ok=True)
        config = run_dir / "clawbus.json5"
        config.write_bytes(orjson.dumps(self.config(), option=orjson.OPT_INDENT_2))
        exe = Path(sys.executable).with_name("clawbus")
        if self.source:
            # A checkout from before the command-line package took the product's
            # name runs it as ``-m cli``.
            module = "clawbus" if (self.source / "clawbus" / "__main__.py").exists() else "cli"
            base = [sys.executable, "-m", module]
        else:
            base = [str(exe)] if exe.exists() else [sys.executable, "-m", "clawbus"]
        env = {**self.env, "CLAWBUS_STATE_DIR": str(state)}
        if self.source:  # children (`python -m clawbus worker`) inherit it
            # The checkout first; a PYTHONPATH of the caller's (a profiling hook's
            # sitecustomize, say) still applies after it.
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.source), os.environ.get("PYTHONPATH", "")) if p)
        cmd = pinned([*base, "up", "--config", str(config), "--workers", str(self.workers),
                      "--gateways", str(self.gateways), "--port", "0",
                      "--log-level", "warning", "--grace", "5"], self.cpus)
        self.proc = Process(self.label, cmd, self.logs / f"{run_dir.name}.log",
                            env=env, cwd=run_dir)
        self._url = self.proc.wait_for(r"clawbus gateway listening on (http://\S+)",
                                       START_TIMEOUT).group(1)

        self.gateway_pids = set()

        def ready() -> bool:
            # Every /readyz is a new connection, which the kernel hands to any of the
            # gateway processes sharing the port: ready once every gateway has
            # answered and one of them counts all the workers.
            status, body = http_get(f"{self._url}/readyz")
            if status != 200:
                return False
            health = orjson.loads(body)
            if "pid" in health:
                self.gateway_pids.add(int(health["pid"]))
            return (int(health.get("workers", 0)) >= self.workers
                    and len(self.gateway_pids) >= self.gateways)

        self.proc.wait_until(
            ready, f"ready with {self.gateways} gateway(s) and {self.workers} workers",
            START_TIMEOUT)



def litellm_venv() -> Path:
    return VENVS / "litellm"


def ensure_litellm(spec: str = "litellm[proxy]") -> Path:
    """The ``litellm`` executable of the harness's own venv, installing it if needed."""
    venv = litellm_venv()
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"bench: installing {spec!r} into {venv} (once; about a minute)", flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    VENVS.mkdir(parents=True, exist_ok=True)
    python = shutil.which("python3") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", spec], check=True)
    if not exe.exists():
        raise RuntimeError(f"pip installed {spec!r} but {exe} is missing")
    return exe


def litellm_version() -> str:
    python = litellm_venv() / "bin" / "python"
    out = subprocess.run([str(python), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip()


class LiteLLM(ProcessSystem):
    key = "litellm"
    label = "LiteLLM"
    auth = LITELLM_KEY
    problem_markers = ("ERROR", "Traceback", "Exception")

    def __init__(self, upstream_url: str, workdir: Path, logs: Path, *,
                 cpus: str | None) -> None:
        self.upstream_url = upstream_url
        self.workdir = workdir
        self.logs = logs
        self.cpus = cpus
        self.proc: Process | None = None
        self.port = 0

    def config(self) -> dict[str, Any]:
        return {
            "model_list": [
                {"model_name": upstream_model(t, d),
                 "litellm_params": {"model": f"openai/{upstream_model(t, d)}",
                                    "api_base": f"{self.upstream_url}/v1",
                                    "api_key": UPSTREAM_KEY}}
                for t, d in SHAPES],
            "general_settings": {"master_key": LITELLM_KEY},
            "litellm_settings": {"drop_params": True, "request_timeout": 300},
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def model(self, tokens: int, delay_ms: float) -> str:
        return upstream_model(tokens, delay_ms)

    def start(self) -> None:
        exe = ensure_litellm()
        run_dir = self.workdir / f"litellm-{next(_STARTS)}"
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_dir / "config.yaml"  # JSON is YAML
        config.write_bytes(orjson.dumps(self.config(), option=orjson.OPT_INDENT_2))
        self.port = free_port()
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_TELEMETRY": "False", "NO_DOCS": "True", "NO_REDOC": "True",
               "DISABLE_ADMIN_UI": "True", "HOME": str(run_dir)}
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPENAI")}, **env}
        cmd = pinned([str(exe), "--config", str(config), "--host", "127.0.0.1",
                      "--port", str(self.port), "--num_workers", "1"], self.cpus)
        self.proc = Process("litellm", cmd, self.logs / f"{run_dir.name}.log", env=env,
                            cwd=run_dir)
        self.proc.wait_until(
            lambda: http_get(f"{self.base_url}/health/liveliness")[0] == 200,
            "listening", START_TIMEOUT)
        time.sleep(0.5)

