"""``compose.yaml``, ``Dockerfile`` and ``deploy/clawbus.json5`` checked without a
Docker engine: the Compose file is interpolated like Compose does, validated
against the Compose Specification's JSON Schema (vendored in ``tests/data``),
and its service graph, ports, healthchecks, commands and mounted config are
checked against what clawbus and ``nats-server`` actually accept. When a
``docker compose`` CLI is available it gets the last word too."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from clawbus.config import ConfigError, check_gateway_startable, load_settings
from clawbus.main import build_parser
from clawbus.natsserver import find_nats_server

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"
TOKEN = "compose-test-token"
ENV = {"OPENCLAW_GATEWAY_TOKEN": TOKEN}

# --------------------------------------------------------------------------- interpolation

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[_A-Za-z][_A-Za-z0-9]*))")
_BRACED = re.compile(r"^(?P<name>[_A-Za-z][_A-Za-z0-9]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset (Compose refuses to start)."""


def _substitute(text: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return env.get(match.group("named"), "")
        braced = _BRACED.match(match.group("braced"))
        if braced is None:
            raise ValueError(f"invalid interpolation {match.group(0)!r}")
        name, op, arg = braced.group("name"), braced.group("op"), braced.group("arg")
        value = env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and not value)
        if op in ("-", ":-"):
            return arg if unset_or_empty else str(value)
        if op in ("?", ":?"):
            if unset_or_empty:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return str(value)
        if op in ("+", ":+"):
            return "" if unset_or_empty else arg
        return value or ""

    return _VAR.sub(one, text)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation, applied to every string value of a loaded file."""
    if isinstance(value, str):
        return _substitute(value, env)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def test_interpolation_follows_compose() -> None:
    env = {"A": "a", "E": ""}
    assert (_substitute("$A ${A} ${B:-d} ${E:-d} ${E-d} ${A:+x} ${B:+x} $$A", env)
            == "a a d d  x  $A")
    with pytest.raises(MissingVariable, match="B is missing a value: say so"):
        _substitute("${B:?say so}", env)
    with pytest.raises(MissingVariable):
        _substitute("${E:?empty is missing too}", env)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))  # `<<:` merges included
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = interpolate(raw, ENV)
    return result


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return result


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def nats_nodes(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services(compose).items()
            if str(svc.get("image", "")).startswith("nats:")}


def clawbus_services(compose: dict[str, Any], role: str | None = None) -> dict[str, dict[str, Any]]:
    """Services running the clawbus image (built from this repository)."""
    return {name: svc for name, svc in services(compose).items()
            if "build" in svc and (role is None or command(svc)[0] == role)}


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def flag(cmd: list[str], *names: str) -> str:
    """The value following the first of ``names`` in an argument list."""
    for i, arg in enumerate(cmd):
        if arg in names:
            return cmd[i + 1]
    raise AssertionError(f"none of {names} in {cmd}")


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of the service's host-path mounts."""
    out = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            if volume.get("type") != "bind":
                continue
            source, target, read_only = volume["source"], volume["target"], bool(
                volume.get("read_only"))
        if source.startswith((".", "/", "~")):
            out.append((source, target, read_only))
    return out


def named_volumes(svc: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        elif volume.get("type") == "volume":
            source, target = volume["source"], volume["target"]
        else:
            continue
        if not source.startswith((".", "/", "~")):
            out.append((source, target))
    return out


def published_ports(svc: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of each published port."""
    out = []
    for port in svc.get("ports", []):
        if isinstance(port, dict):
            out.append((int(port["published"]), int(port["target"])))
            continue
        spec = str(port).split("/")[0]
        parts = spec.rsplit(":", 2)
        assert len(parts) >= 2, f"port {port!r} is not published on a fixed host port"
        out.append((int(parts[-2]), int(parts[-1])))
    return out


def mounted_config(compose: dict[str, Any], svc: dict[str, Any]) -> Path:
    """The host file mounted where the service's CLAWBUS_CONFIG points."""
    target = environment(svc)["CLAWBUS_CONFIG"]
    (source,) = [src for src, tgt, _ in bind_mounts(svc) if tgt == target]
    return (COMPOSE_FILE.parent / source).resolve()


# --------------------------------------------------------------------------- schema


def validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    # The file says "$schema": "https://json-schema.org/draft-07/schema", a spelling
    # jsonschema does not map to a draft by itself: name the draft explicitly.
    assert "draft-07" in schema["$schema"]
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_spec_schema(
        compose: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors)


@pytest.mark.parametrize("mutate", [
    lambda c: c["services"]["worker"].update(portz=["1:1"]),
    lambda c: c["services"]["gateway-1"]["depends_on"]["nats-1"].update(condition="healthy"),
    lambda c: c["services"]["gateway-1"]["healthcheck"].update(test=42),
    lambda c: c.update(servics={}),
], ids=["unknown-service-key", "bad-condition", "bad-healthcheck", "unknown-top-level-key"])
def test_the_vendored_schema_catches_mistakes(
        compose: dict[str, Any], schema: dict[str, Any], mutate: Any) -> None:
    broken = json.loads(json.dumps(compose))
    mutate(broken)
    assert list(validator(schema).iter_errors(broken))


def test_the_gateway_token_must_come_from_the_environment(raw: dict[str, Any]) -> None:
    with pytest.raises(MissingVariable, match="OPENCLAW_GATEWAY_TOKEN"):
        interpolate(raw, {})
    for svc in clawbus_services(interpolate(raw, ENV), "gateway").values():
        assert environment(svc)["OPENCLAW_GATEWAY_TOKEN"] == TOKEN


# --------------------------------------------------------------------------- service graph


def test_three_nats_nodes_route_to_each_other(compose: dict[str, Any]) -> None:
    nodes = nats_nodes(compose)
    assert len(nodes) == 3
    names, cluster_names, stores = set(), set(), set()
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in nodes.items():
        cmd = command(svc)
        assert "-js" in cmd or "--jetstream" in cmd
        names.add(flag(cmd, "--server_name", "-n", "--name"))
        cluster_names.add(flag(cmd, "--cluster_name"))
        cluster = urlsplit(flag(cmd, "--cluster"))
        assert (cluster.hostname, cluster.port) == ("0.0.0.0", 6222)
        routes = [urlsplit(u.strip()) for u in flag(cmd, "--routes").split(",")]
        assert {r.hostname for r in routes} == set(nodes) - {name}, "routes to the other two"
        assert {r.port for r in routes} == {6222}
        store = flag(cmd, "--store_dir", "-sd")
        (volume,) = [v for v, target in named_volumes(svc) if target == store]
        assert volume in declared_volumes
        stores.add(volume)
        assert "container_name" not in svc or svc["container_name"] == name
        healthcheck = " ".join(svc["healthcheck"]["test"])
        assert "/healthz" in healthcheck and flag(cmd, "--http_port", "-m") in healthcheck
    assert len(names) == 3, "JetStream needs a distinct, stable server name per node"
    assert len(cluster_names) == 1
    assert len(stores) == 3, "each node has its own JetStream volume"


def test_nats_server_accepts_the_node_flags(compose: dict[str, Any]) -> None:
    """The same flags, parsed by the real nats-server (`-t` stops right after parsing)."""
    binary = find_nats_server()
    for svc in nats_nodes(compose).values():
        proc = subprocess.run([binary, *command(svc), "-t"], capture_output=True, text=True,
                              timeout=30, check=False)
        output = proc.stdout + proc.stderr
        assert "flag provided but not defined" not in output, output
        assert "must specify [-c, --config]" in output, output  # parsing got that far


def test_gateways_and_workers_wait_for_every_nats_node(compose: dict[str, Any]) -> None:
    nodes = set(nats_nodes(compose))
    clawbus = clawbus_services(compose)
    assert set(clawbus) == {*clawbus_services(compose, "gateway"),
                            *clawbus_services(compose, "worker")}
    for name, svc in clawbus.items():
        depends = svc["depends_on"]
        assert set(depends) == nodes, name
        assert all(d["condition"] == "service_healthy" for d in depends.values()), name
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure")
    for name in nodes:
        assert "depends_on" not in services(compose)[name], "nodes start together"


def test_two_gateways_published_on_their_own_ports(compose: dict[str, Any]) -> None:
    gateways = clawbus_services(compose, "gateway")
    assert len(gateways) == 2
    host_ports = []
    for name, svc in gateways.items():
        settings = load_settings(mounted_config(compose, svc), env=environment(svc))
        ((host, container),) = published_ports(svc)
        assert container == settings.gateway.port, name
        host_ports.append(host)
        healthcheck = svc["healthcheck"]
        test = healthcheck["test"]
        assert test[0] == "CMD" and test[1] == "python", "slim images have python, not curl"
        assert f"http://127.0.0.1:{settings.gateway.port}/readyz" in test[-1]
        compile(test[-1], "<healthcheck>", "exec")  # the one-liner is valid Python
    assert sorted(host_ports) == [18789, 18790]


def test_worker_service_scales(compose: dict[str, Any]) -> None:
    (worker,) = clawbus_services(compose, "worker").values()
    assert "container_name" not in worker
    assert "ports" not in worker and "hostname" not in worker
    assert worker["deploy"]["replicas"] >= 1
    grace = float(flag(command(worker), "--grace"))
    stop = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert stop and int(stop.group(1)) > grace, "docker must not SIGKILL a draining worker"
    settings = load_settings(mounted_config(compose, worker), env=environment(worker))
    for provider in settings.models.providers.values():
        if provider.api_key_env:
            assert provider.api_key_env in environment(worker)


def test_commands_are_valid_clawbus_invocations(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name, svc in clawbus_services(compose).items():
        args = parser.parse_args(command(svc))
        assert args.command in ("gateway", "worker"), name
        assert args.config is None, "the config comes from CLAWBUS_CONFIG"


# --------------------------------------------------------------------------- files


def test_referenced_files_exist(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        build = svc.get("build")
        if build is not None:
            context = COMPOSE_FILE.parent / (build if isinstance(build, str)
                                             else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get(
                "dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), name
        for source, _target, read_only in bind_mounts(svc):
            assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source}"
            assert read_only, f"{name}: {source} should be mounted read-only"


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    instructions = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(op == "RUN" and "pip install ." in arg for op, arg in instructions)
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [json.loads(arg) for op, arg in instructions if op == "ENTRYPOINT"] == [["clawbus"]]
    # .dockerignore ignores everything ("**") but what the COPY lines need (no .venv,
    # .git or tests in the build context).
    ignore = {ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8")
              .splitlines() if ln.strip() and not ln.startswith("#")}
    assert "**" in ignore
    for op, arg in instructions:
        if op == "COPY":
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/**" in ignore, source


def test_the_image_gets_every_file_of_the_packages() -> None:
    """The image installs with `pip install .` (not editable): a subpackage missing from
    `packages`, or a data file (the web page's static files) missing from `package-data`,
    would be absent from the container while every local run still finds it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "tool"]["setuptools"]
    packages = set(setuptools["packages"])
    package_data: dict[str, list[str]] = setuptools.get("package-data", {})
    copied = {ln.split()[1] for ln in (ROOT / "Dockerfile").read_text().splitlines()
              if ln.startswith("COPY") and (ROOT / ln.split()[1]).is_dir()}
    assert copied == {p for p in packages if "." not in p}, "COPY every top-level package"
    for top in copied:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if "__pycache__" in rel.parts or path.is_dir() or path.suffix == ".pyc":
                continue
            package = ".".join(rel.parent.parts)
            if path.suffix == ".py":
                assert package in packages, f"{rel}: add {package!r} to packages"
                continue
            owner = max((p for p in packages if package == p or package.startswith(p + ".")),
                        key=len)
            inside = path.relative_to(ROOT / owner.replace(".", "/")).as_posix()
            assert any(fnmatch.fnmatch(inside, pattern)
                       for pattern in package_data.get(owner, [])), (
                f"{rel} is not in package-data: the image would not have it")


def test_the_mounted_config_starts_a_gateway_on_the_nats_cluster(compose: dict[str, Any]) -> None:
    configs = {mounted_config(compose, svc) for svc in clawbus_services(compose).values()}
    assert configs == {ROOT / "deploy" / "clawbus.json5"}, "one shared config"
    (path,) = configs
    settings = load_settings(path, env=ENV)
    check_gateway_startable(settings)
    assert settings.gateway.host == "0.0.0.0", "bind lan: reachable from outside the container"
    assert settings.gateway.http.endpoints.chat_completions.enabled
    assert settings.auth_mode == "token" and settings.gateway.auth.token == TOKEN
    assert settings.bus.url is not None
    bus = [urlsplit(u.strip()) for u in settings.bus.url.split(",")]
    assert {(u.scheme, u.hostname, u.port) for u in bus} == {
        ("nats", name, 4222) for name in nats_nodes(compose)}
    assert settings.bus.replicas in (None, 3)
    # The secret lives in the environment only.
    assert "token:" not in re.sub(r"//.*", "", path.read_text(encoding="utf-8"))
    with pytest.raises(ConfigError, match="OPENCLAW_GATEWAY_TOKEN"):
        check_gateway_startable(load_settings(path, env={}))


# --------------------------------------------------------------------------- docker compose


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(["docker", "compose", "version"], capture_output=True,
                              timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@pytest.mark.skipif(not _docker_compose_works(),
                    reason="no `docker compose` CLI plugin on this machine")
def test_docker_compose_config_accepts_the_file() -> None:
    # `config` only parses, interpolates and validates: no engine needed.
    env = {**os.environ, **ENV}
    run = ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    del env["OPENCLAW_GATEWAY_TOKEN"]
    missing = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False,
                             env=env, cwd=ROOT)
    assert missing.returncode != 0 and "OPENCLAW_GATEWAY_TOKEN" in missing.stderr


# --------------------------------------------------------------------------- tracing overlay

TRACING_FILE = ROOT / "deploy" / "compose.tracing.yaml"


def merged(base: Any, over: Any) -> Any:
    """``over`` laid on ``base`` as Compose merges files: mappings key by key."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: merged(base.get(k), v) for k, v in over.items()}}
    return over


def test_the_tracing_overlay_sends_every_clawbus_process_to_jaeger(
        compose: dict[str, Any], schema: dict[str, Any]) -> None:
    overlay = yaml.safe_load(TRACING_FILE.read_text(encoding="utf-8"))
    both = merged(compose, interpolate(overlay, ENV))
    errors = list(validator(schema).iter_errors(both))
    assert not errors, [e.message for e in errors]
    assert set(overlay["services"]) - set(services(compose)) == {"jaeger"}
    jaeger = services(both)["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    for name, svc in clawbus_services(both).items():
        assert environment(svc)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
        assert "CLAWBUS_CONFIG" in environment(svc), name  # compose.yaml's, kept
        assert {"jaeger", "nats-1"} <= set(svc["depends_on"]), name
