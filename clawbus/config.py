"""Configuration: one JSON5 file validated into one typed :class:`Settings` object.

The file mirrors OpenClaw's keys (camelCase). Unknown keys are errors that name
the key path, so that a typo cannot silently disable auth. Secrets may come from
the environment (``OPENCLAW_GATEWAY_TOKEN`` / ``OPENCLAW_GATEWAY_PASSWORD``); a
value in the file wins. :func:`load_settings` is the only place that reads the
environment; everything else receives the resulting object.

This module lives in ``bus`` because gateways, workers and the CLI all need it
and ``bus`` is the only package every side imports.

Agent tools (SPEC §9) merge like this: an agent's effective ``tools`` are
``agents.defaults.tools`` with the agent's own ``tools`` over them, key by key.
``mcpServers`` are joined (a server of the same name: the agent's wins, whole);
``allow``, ``deny``, ``maxRounds``, ``callTimeoutSeconds`` and
``resultMaxChars`` are the agent's where it sets them, else the defaults'
(:meth:`Settings.agent_tools`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import json5
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

AGENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_STATE_DIR = "~/.clawbus"
DEFAULT_CONFIG_NAME = "clawbus.json5"
TOKEN_ENV = "OPENCLAW_GATEWAY_TOKEN"
PASSWORD_ENV = "OPENCLAW_GATEWAY_PASSWORD"
CONFIG_ENV = "CLAWBUS_CONFIG"
STATE_DIR_ENV = "CLAWBUS_STATE_DIR"


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` says what to change."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        # Python code may construct by field name; files are validated camelCase-only
        # (see parse_settings). No silent coercion: `port: true` is an error, not 1.
        validate_by_name=True,
        validate_by_alias=True,
        strict=True,
        frozen=True,
    )


class RateLimitConfig(_Model):
    max_attempts: int = Field(10, ge=1)
    window_seconds: float = Field(60.0, gt=0)
    lockout_seconds: float = Field(300.0, gt=0)


class AuthConfig(_Model):
    mode: Literal["token", "password", "none"] | None = None
    token: str | None = None
    password: str | None = None
    rate_limit: RateLimitConfig = RateLimitConfig()


# A MIME type as `type/subtype` (RFC 6838 name characters, lower case), no parameters.
MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
# A DNS name in ASCII (IDNs as punycode), one label at least.
_HOST = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


class ImagesConfig(_Model):
    """Image parts of chat requests (SPEC §8): which MIME types are taken, and
    whether and how ``http(s)`` image URLs are fetched by the gateway."""

    allow_url: bool = False
    # Lists in the file: strict mode alone would want a Python tuple.
    allowed_mimes: tuple[str, ...] = Field(
        ("image/jpeg", "image/png", "image/gif", "image/webp"), strict=False)
    max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    timeout_ms: int = Field(10_000, ge=1)
    max_redirects: int = Field(3, ge=0)
    # Hosts an image URL may name: `img.example.com`, or `*.example.com` for any
    # name below example.com (not example.com itself). Empty: any host.
    url_allowlist: tuple[str, ...] = Field((), strict=False)

    @field_validator("allowed_mimes")
    @classmethod
    def _check_mimes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        mimes = tuple(m.strip().lower() for m in value)
        for mime in mimes:
            if not MIME_TYPE.fullmatch(mime):
                raise ValueError(f"{mime!r} is not a MIME type like 'image/png'")
        return mimes

    @field_validator("url_allowlist")
    @classmethod
    def _check_allowlist(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        patterns = tuple(p.strip().lower().rstrip(".") for p in value)
        for pattern in patterns:
            host = pattern.removeprefix("*.")
            if not _HOST.fullmatch(host) and not (host == pattern and _is_ip(host)):
                raise ValueError(f"{pattern!r} is not a host name, '*.suffix' or IP address "
                                 f"(international names in punycode, xn--...)")
        return patterns


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class ChatCompletionsConfig(_Model):
    enabled: bool = False
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    images: ImagesConfig = ImagesConfig()


class ResponsesConfig(_Model):
    """``POST /v1/responses`` (SPEC §10); images follow ``chatCompletions.images``."""

    enabled: bool = False
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)


class EndpointsConfig(_Model):
    chat_completions: ChatCompletionsConfig = ChatCompletionsConfig()
    responses: ResponsesConfig = ResponsesConfig()


class HttpConfig(_Model):
    endpoints: EndpointsConfig = EndpointsConfig()


class ControlUiConfig(_Model):
    enabled: bool | None = None


class GatewayConfig(_Model):
    port: int = Field(18789, ge=0, le=65535)
    bind: str = "loopback"
    auth: AuthConfig = AuthConfig()
    http: HttpConfig = HttpConfig()
    control_ui: ControlUiConfig = ControlUiConfig()
    keepalive_seconds: float = Field(15.0, gt=0)

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        if value in ("loopback", "lan"):
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("must be 'loopback', 'lan' or an IP address") from None
        return value

    @property
    def host(self) -> str:
        """The address to bind the listening socket to."""
        return {"loopback": "127.0.0.1", "lan": "0.0.0.0"}.get(self.bind, self.bind)

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback


MCP_SERVER_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class McpServerConfig(_Model):
    """One MCP server (SPEC §9): a child process spoken to over stdio (``command``,
    with ``env`` and ``cwd``) or a streamable-HTTP endpoint (``url``, with
    ``headers``); exactly one of ``command`` and ``url``. A stdio server's
    environment is its ``env`` plus the MCP SDK's few safe variables (``PATH``,
    ``HOME``, ``USER``, ...), never the rest of the worker's."""

    # A list in the file: strict mode alone would want a Python tuple.
    command: tuple[str, ...] | None = Field(None, strict=False)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("command must name a program: [\"program\", \"arg\", ...]")
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"env: {name!r} is not an environment variable name")
            if "\0" in text:
                raise ValueError(f"env: {name!r}: a value may not contain NUL")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value, "url")

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerConfig:
        if self.command is not None and self.url is not None:
            raise ValueError("set command (a stdio server) or url (a streamable-HTTP server), "
                             "not both")
        if self.command is None and self.url is None:
            raise ValueError("set command (a stdio server) or url (a streamable-HTTP server)")
        if self.url is not None and (self.env or self.cwd is not None):
            raise ValueError("env and cwd apply to stdio servers (command), not to url")
        if self.command is not None and self.headers:
            raise ValueError("headers apply to streamable-HTTP servers (url), not to command")
        return self


class AgentToolsConfig(_Model):
    """An agent's own tools (SPEC §9): the MCP servers serving them, which of their
    tools it is offered (``allow``/``deny``: globs on the model-facing name
    ``<server>__<tool>``; deny wins; no ``allow``: all), and the loop's limits.
    How an agent's tools merge with the defaults': the module docstring."""

    mcp_servers: dict[str, McpServerConfig] = Field(default_factory=dict)
    allow: tuple[str, ...] | None = Field(None, strict=False)
    deny: tuple[str, ...] = Field((), strict=False)
    max_rounds: int = Field(8, ge=1)
    call_timeout_seconds: float = Field(60.0, gt=0)
    result_max_chars: int = Field(16_000, ge=100)

    @field_validator("mcp_servers")
    @classmethod
    def _check_names(cls, value: dict[str, McpServerConfig]) -> dict[str, McpServerConfig]:
        for name in value:
            if not MCP_SERVER_NAME.fullmatch(name):
                raise ValueError(f"MCP server name {name!r} does not match "
                                 f"[A-Za-z0-9_-]{{1,32}}")
        return value


class AgentDefaults(_Model):
    model: str = "echo/echo"
    # ``provider/model`` for ``POST /v1/embeddings`` (SPEC §11); None: agents
    # without one of their own have none.
    embedding_model: str | None = None
    timeout_seconds: float = Field(600.0, gt=0)
    max_concurrent: int = Field(16, ge=1, le=4096)
    tools: AgentToolsConfig = AgentToolsConfig()


class AgentConfig(_Model):
    id: str
    default: bool = False
    model: str | None = None
    embedding_model: str | None = None
    system_prompt: str | None = None
    system_prompt_file: str | None = None
    timeout_seconds: float | None = Field(None, gt=0)
    tools: AgentToolsConfig | None = None

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        value = value.strip().lower()
        if not AGENT_ID_RE.match(value):
            raise ValueError("agent ids match [a-z0-9][a-z0-9_-]{0,63}")
        return value

    @model_validator(mode="after")
    def _one_prompt_source(self) -> AgentConfig:
        if self.system_prompt is not None and self.system_prompt_file is not None:
            raise ValueError("set systemPrompt or systemPromptFile, not both")
        return self


class AgentsConfig(_Model):
    defaults: AgentDefaults = AgentDefaults()
    entries: list[AgentConfig] = Field(default_factory=list, alias="list")


# RFC 9110 token characters: what an HTTP header name may hold.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class ProviderConfig(_Model):
    api: Literal["openai-completions", "anthropic-messages", "echo"]
    base_url: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float = Field(120.0, gt=0)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    # echo only: delay between streamed words, for try-outs and tests.
    token_delay_ms: float = Field(0.0, ge=0)

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value, "baseUrl")

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)


def _check_http_url(value: str, key: str) -> str:
    """``value`` if it is an http(s) URL with a host; else a ValueError naming ``key``."""
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{key} {value!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} {value!r} is not an http:// or https:// URL with a host")
    return value


def _check_headers(value: dict[str, str]) -> dict[str, str]:
    """``value`` if every header name is an HTTP token and every value is sendable."""
    for name, text in value.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"header name {name!r} is not an HTTP token")
        if any(c in text for c in "\r\n\0"):
            raise ValueError(f"header {name!r}: a value may not contain CR, LF or NUL")
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"header {name!r}: the value is not Latin-1 text") from None
    return value


class ModelsConfig(_Model):
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)


class SessionConfig(_Model):
    # How much earlier conversation (characters of user + assistant text) a run sees.
    history_budget_chars: int = Field(32_000, ge=0)
    # Transcripts older than this are dropped by the bus (0 = keep forever).
    max_age_days: float = Field(30.0, ge=0)


class BusConfig(_Model):
    url: str | None = None
    # No worker accepted a run within this → 503.
    queue_timeout_seconds: float = Field(30.0, gt=0)
    # A worker that stops reporting this long after accepting is treated as gone.
    heartbeat_seconds: float = Field(5.0, gt=0)
    # Redelivery delay of a run whose worker died; the session lease lives as long.
    ack_wait_seconds: float = Field(30.0, ge=3)
    # Replicas of streams and buckets (None: min(3, cluster size)).
    replicas: int | None = Field(None, ge=1, le=5)
    # Events a gateway buffers per run for its client; a client that falls this
    # far behind (it stopped reading) is cut off and its run cancelled.
    event_queue_size: int = Field(2048, ge=8, le=1_000_000)
    # When the embedded nats-server fsyncs JetStream's file store: "default" (the
    # server's own interval, 2 minutes), "always" (every write, before its ack),
    # or an interval like "10s" (units ms, s, m, h). Not used with `url`: an
    # external server's own config decides.
    sync: str = "default"

    @field_validator("sync")
    @classmethod
    def _check_sync(cls, value: str) -> str:
        if value != "default" and not re.fullmatch(r"always|[1-9]\d*(ms|s|m|h)", value):
            raise ValueError(f"must be \"default\", \"always\" or an interval like \"10s\" "
                             f"(units ms, s, m, h), not {value!r}")
        return value

    @property
    def sync_interval(self) -> str | None:
        """JetStream's ``sync_interval`` for the embedded server (None: its default)."""
        return None if self.sync == "default" else self.sync


# OTEL_TRACES_SAMPLER's names; the ratio ones take ":<ratio>" (default 1.0).
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")


def parse_sampler(text: str) -> tuple[str, float | None]:
    """``(name, ratio)`` of a sampler written as ``name`` or ``name:ratio`` (ratio
    only for the ``traceidratio`` ones, 0..1); ValueError saying what is wrong."""
    name, sep, arg = text.strip().lower().partition(":")
    if name not in SAMPLERS:
        raise ValueError(f"sampler {text!r} is not one of {', '.join(SAMPLERS)} "
                         f"(ratio samplers as 'traceidratio:0.1')")
    if not name.endswith("traceidratio"):
        if sep:
            raise ValueError(f"sampler {name!r} takes no ratio")
        return name, None
    if not sep:
        return name, 1.0
    try:
        ratio = float(arg)
    except ValueError:
        raise ValueError(f"sampler {text!r}: the ratio must be a number from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"sampler {text!r}: the ratio must be a number from 0 to 1")
    return name, ratio


class OtlpConfig(_Model):
    """Where traces go: an OTLP/HTTP (protobuf) collector's base URL, as
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``/v1/traces`` is appended), and headers
    sent with every export (e.g. an API key)."""

    endpoint: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value, "endpoint")

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)


class TelemetryConfig(_Model):
    """OpenTelemetry tracing (SPEC §13), off unless an OTLP endpoint is set here or
    in the standard ``OTEL_*`` variables, which win over these keys
    (clawbus/telemetry.py)."""

    otlp: OtlpConfig = OtlpConfig()
    service_name: str | None = Field(None, min_length=1)
    sampler: str = "parentbased_always_on"
    # Prompt and reply text in spans (gen_ai.prompt / gen_ai.completion events).
    capture_content: bool = False

    @field_validator("sampler")
    @classmethod
    def _check_sampler(cls, value: str) -> str:
        parse_sampler(value)
        return value.strip().lower()


class Settings(_Model):
    gateway: GatewayConfig = GatewayConfig()
    agents: AgentsConfig = AgentsConfig()
    models: ModelsConfig = ModelsConfig()
    session: SessionConfig = SessionConfig()
    bus: BusConfig = BusConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    # Resolved at load time, never read from the file.
    state_dir: Path = Field(default=Path(DEFAULT_STATE_DIR).expanduser(), exclude=True)
    config_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _check_agents(self) -> Settings:
        seen: set[str] = set()
        for agent in self.agents.entries:
            if agent.id in seen:
                raise ValueError(f"duplicate agent id '{agent.id}'")
            seen.add(agent.id)
        for agent in self.agents.entries:
            model = self.agents.defaults.model if agent.model is None else agent.model
            self._check_model_ref(model, f"agent '{agent.id}'")
        if not self.agents.entries:
            self._check_model_ref(self.agents.defaults.model, "agents.defaults.model")
        if self.agents.defaults.embedding_model is not None:
            self._check_model_ref(self.agents.defaults.embedding_model,
                                  "agents.defaults.embeddingModel")
        for agent in self.agents.entries:
            if agent.embedding_model is not None:
                self._check_model_ref(agent.embedding_model, f"agent '{agent.id}' embeddingModel")
        return self

    def _check_model_ref(self, ref: str, where: str) -> None:
        provider, sep, model = ref.partition("/")
        if not sep or not provider or not model:
            raise ValueError(f"{where}: model '{ref}' must look like 'provider/model-id'")
        if provider not in self.providers:
            raise ValueError(f"{where}: model '{ref}' names unknown provider '{provider}'")

    @property
    def providers(self) -> dict[str, ProviderConfig]:
        """Configured providers plus the built-in offline ``echo``."""
        merged = {"echo": ProviderConfig(api="echo")}
        merged.update(self.models.providers)
        return merged

    @property
    def agent_ids(self) -> list[str]:
        return [a.id for a in self.agents.entries] or ["main"]

    @property
    def default_agent_id(self) -> str:
        for agent in self.agents.entries:
            if agent.default:
                return agent.id
        return self.agent_ids[0]

    def agent(self, agent_id: str) -> AgentConfig | None:
        """The agent with this id (case-insensitive), or None if unknown."""
        agent_id = agent_id.lower()
        for agent in self.agents.entries:
            if agent.id == agent_id:
                return agent
        if not self.agents.entries and agent_id == "main":
            return AgentConfig(id="main", default=True)
        return None

    def agent_model(self, agent: AgentConfig) -> tuple[str, ProviderConfig, str]:
        """(provider name, provider config, model id) for an agent."""
        provider, _, model = (agent.model or self.agents.defaults.model).partition("/")
        return provider, self.providers[provider], model

    def agent_embedding_model(self, agent: AgentConfig) -> str | None:
        """The agent's ``provider/model`` for embeddings: its own, else the defaults'."""
        return agent.embedding_model or self.agents.defaults.embedding_model

    def agent_system_prompt(self, agent: AgentConfig) -> str:
        """The agent's own system prompt (reading ``systemPromptFile`` relative to the config)."""
        if agent.system_prompt_file is not None:
            path = Path(agent.system_prompt_file).expanduser()
            if not path.is_absolute():
                path = self.config_dir / path
            return path.read_text(encoding="utf-8")
        return agent.system_prompt or ""

    def agent_timeout(self, agent: AgentConfig) -> float:
        return agent.timeout_seconds or self.agents.defaults.timeout_seconds

    def longest_agent_timeout(self) -> float:
        """The longest any agent's run may take."""
        agents = [a for a in map(self.agent, self.agent_ids) if a is not None]
        return max((self.agent_timeout(a) for a in agents),
                   default=self.agents.defaults.timeout_seconds)

    def agent_tools(self, agent: AgentConfig) -> AgentToolsConfig:
        """The agent's effective tools: the defaults' with the agent's own over them
        (the merge rule of the module docstring)."""
        defaults = self.agents.defaults.tools
        own = agent.tools
        if own is None:
            return defaults
        update = {name: getattr(own, name) for name in own.model_fields_set}
        update["mcp_servers"] = {**defaults.mcp_servers, **own.mcp_servers}
        return defaults.model_copy(update=update)

    @property
    def auth_mode(self) -> Literal["token", "password", "none"]:
        """The effective auth mode (inferred from whichever secret exists when unset)."""
        auth = self.gateway.auth
        if auth.mode is not None:
            return auth.mode
        if auth.token:
            return "token"
        if auth.password:
            return "password"
        return "none"

    @property
    def secret(self) -> str | None:
        """The secret clients must present, for the effective auth mode."""
        mode = self.auth_mode
        if mode == "token":
            return self.gateway.auth.token
        if mode == "password":
            return self.gateway.auth.password
        return None

    @property
    def control_ui_enabled(self) -> bool:
        enabled = self.gateway.control_ui.enabled
        return self.gateway.is_loopback if enabled is None else enabled

    def provider_api_key(self, provider: ProviderConfig, env: Mapping[str, str]) -> str | None:
        """The provider key: ``apiKey`` from the file, else the env var ``apiKeyEnv`` names."""
        if provider.api_key:
            return provider.api_key
        if provider.api_key_env:
            return env.get(provider.api_key_env) or None
        return None


def default_config_path(env: Mapping[str, str]) -> Path:
    return Path(env.get(CONFIG_ENV) or f"{DEFAULT_STATE_DIR}/{DEFAULT_CONFIG_NAME}").expanduser()


def state_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).expanduser()


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def _format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        loc = _format_loc(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key")
        else:
            problems.append(f"{loc}: {err['msg']}")
    if len(problems) == 1:
        return f"invalid configuration in {source}: {problems[0]}"
    return "\n  ".join([f"invalid configuration in {source}:", *problems])


# What the providers' HTTP client can speak to a proxy (workers/providers/http_client).
PROXY_SCHEMES = ("http", "https")


def env_proxies(env: Mapping[str, str]) -> dict[str, str]:
    """``{scheme: proxy URL}`` from the ``<scheme>_proxy`` variables of ``env``, read
    as :func:`urllib.request.getproxies_environment` reads ``os.environ``: lower-case
    names win, ``no`` holds ``NO_PROXY``, and a CGI request's ``HTTP_PROXY`` is
    ignored."""
    proxies: dict[str, str] = {}
    for name, value in env.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = value
    if "REQUEST_METHOD" in env:  # httpoxy: a client's "Proxy:" header, not a setting
        proxies.pop("http", None)
    for name, value in env.items():
        if name.endswith("_proxy"):
            if value:
                proxies[name[:-6]] = value
            else:
                proxies.pop(name[:-6], None)
    return proxies


def proxy_for(url: str, env: Mapping[str, str]) -> str | None:
    """The proxy for requests to ``url``: ``<SCHEME>_PROXY`` or ``ALL_PROXY``, unless
    ``NO_PROXY`` exempts its host; None to connect directly."""
    parts = urllib.parse.urlsplit(url)
    proxies = env_proxies(env)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or (parts.hostname and _no_proxy(parts.hostname, proxies.get("no", ""))):
        return None
    return proxy


def _no_proxy(host: str, no_proxy: str) -> bool:
    """``NO_PROXY`` (``*`` or comma-separated domain suffixes) exempts ``host``."""
    if no_proxy.strip() == "*":
        return True
    host = host.lower()
    for entry in no_proxy.split(","):
        name = entry.strip().lstrip(".").lower()
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def proxy_problem(proxy: str) -> str | None:
    """Why the providers' HTTP client cannot use the proxy URL ``proxy``; None if it can."""
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # without credentials
    try:
        _ = parts.port
    except ValueError as exc:
        return f"{shown}: {exc}"
    if parts.scheme not in PROXY_SCHEMES:
        return f"{shown}: only http:// and https:// proxies are supported"
    if not parts.hostname:
        return f"{shown}: no host"
    return None


def _check_proxies(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """What is wrong with the proxy each HTTP provider would use, found when the
    settings are loaded rather than on a worker's first run."""
    proxies = env_proxies(env)
    problems = []
    for name, provider in settings.models.providers.items():
        if provider.api == "echo":
            continue
        # Without a baseUrl a provider calls its vendor's https:// API, whose host
        # only the workers know: NO_PROXY is not consulted for it here.
        url = provider.base_url or "https://"
        proxy = proxy_for(url, env)
        problem = proxy_problem(proxy) if proxy else None
        if problem is not None:
            scheme = urllib.parse.urlsplit(url).scheme
            variable = f"{scheme}_proxy" if proxies.get(scheme) else "all_proxy"
            problems.append(f"models.providers.{name}: the proxy in {variable.upper()} "
                            f"cannot be used: {problem}")
    return problems


def parse_settings(raw: Any, *, source: str = "<config>", env: Mapping[str, str] | None = None,
                   config_dir: Path | None = None) -> Settings:
    """Validate an already-parsed config document and fold in env secrets and paths."""
    env = os.environ if env is None else env
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be an object")
    for key in ("stateDir", "state_dir", "configDir", "config_dir"):
        if key in raw:  # Settings fields resolved at load time, never read from the file
            raise ConfigError(f"invalid configuration in {source}: {key}: unknown key")
    try:
        settings = Settings.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    problems = _check_proxies(settings, env)
    if problems:
        raise ConfigError("\n  ".join([f"invalid proxy settings for {source}:", *problems]))
    auth = settings.gateway.auth
    auth = auth.model_copy(update={
        "token": auth.token or env.get(TOKEN_ENV) or None,
        "password": auth.password or env.get(PASSWORD_ENV) or None,
    })
    gateway = settings.gateway.model_copy(update={"auth": auth})
    return settings.model_copy(update={
        "gateway": gateway,
        "state_dir": state_dir(env),
        "config_dir": config_dir or Path("."),
    })


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load the config file (``path``, else ``$CLAWBUS_CONFIG``, else the default).

    A missing *default* file means all defaults; a missing explicit file is an error.
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get(CONFIG_ENV))
    file = Path(path).expanduser() if path is not None else default_config_path(env)
    if not file.exists():
        if explicit:
            raise ConfigError(f"config file not found: {file}")
        return parse_settings({}, source="defaults", env=env)
    try:
        raw = json5.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse {file}: {exc}") from None
    return parse_settings(raw, source=str(file), env=env, config_dir=file.parent.resolve())


def check_gateway_startable(settings: Settings) -> None:
    """Refuse unsafe or incomplete auth before a gateway opens its port."""
    mode = settings.auth_mode
    if mode == "token" and not settings.gateway.auth.token:
        raise ConfigError(
            f"gateway.auth.mode is 'token' but no token is set: set gateway.auth.token "
            f"or the {TOKEN_ENV} environment variable"
        )
    if mode == "password" and not settings.gateway.auth.password:
        raise ConfigError(
            f"gateway.auth.mode is 'password' but no password is set: set "
            f"gateway.auth.password or the {PASSWORD_ENV} environment variable"
        )
    if mode == "none" and not settings.gateway.is_loopback:
        raise ConfigError(
            f"refusing to bind {settings.gateway.host} with gateway.auth.mode 'none': "
            f"set a token or password, or bind to loopback"
        )


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as camelCase JSON with secrets masked (for `config check`)."""
    data = settings.model_dump(mode="json", by_alias=True)
    auth = data["gateway"]["auth"]
    for key in ("token", "password"):
        if auth.get(key):
            auth[key] = "***"
    for provider in data["models"]["providers"].values():
        if provider.get("apiKey"):
            provider["apiKey"] = "***"
        provider["headers"] = {k: "***" for k in provider.get("headers", {})}
    data["gateway"]["auth"]["mode"] = settings.auth_mode
    otlp = data["telemetry"]["otlp"]
    otlp["headers"] = {k: "***" for k in otlp.get("headers", {})}
    _mask_tools(settings, data["agents"])
    return data


def _mask_tools(settings: Settings, agents: dict[str, Any]) -> None:
    """Agent tools in ``config check``'s output: shown only where the file sets
    them (an agent's: only the keys it sets, the rest comes from the defaults), with
    MCP servers' ``env`` and ``headers`` values masked (tokens live there)."""
    if "tools" not in settings.agents.defaults.model_fields_set:
        del agents["defaults"]["tools"]
    shown = [agents["defaults"].get("tools")]
    for entry, agent in zip(agents["list"], settings.agents.entries, strict=True):
        if agent.tools is None:
            del entry["tools"]
        else:
            entry["tools"] = agent.tools.model_dump(mode="json", by_alias=True,
                                                    exclude_unset=True)
        shown.append(entry.get("tools"))
    for tools in shown:
        for server in (tools or {}).get("mcpServers", {}).values():
            for key in ("env", "headers"):
                if key in server:
                    server[key] = {k: "***" for k in server[key]}
