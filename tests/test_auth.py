"""Unit tests for gateway.auth and gateway.errors (SPEC §2 auth rows), with a fake clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from clawbus.config import Settings, parse_settings
from gateway import errors
from gateway.auth import Authenticator, normalize_client_ip, parse_bearer, secrets_equal
from gateway.errors import ApiError

SCHEMA_PATH = Path("/work/shared/openai-schemas/error_response.strict.json")
SECRET = "s3cret-token"
RATE_LIMITED = "Too many failed authentication attempts. Please try again later."
REMOTE = "203.0.113.7"
OTHER = "198.51.100.9"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(
    auth: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> Settings:
    raw: dict[str, Any] = {"gateway": {"auth": auth if auth is not None else {"token": SECRET}}}
    return parse_settings(raw, env=env or {})


def limited(max_attempts: int = 3, window: float = 60, lockout: float = 300) -> Settings:
    return make_settings(
        {
            "token": SECRET,
            "rateLimit": {
                "maxAttempts": max_attempts,
                "windowSeconds": window,
                "lockoutSeconds": lockout,
            },
        }
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def raises(auth: Authenticator, header: str | None, ip: str | None = REMOTE) -> ApiError:
    with pytest.raises(ApiError) as info:
        auth.check(header, ip)
    return info.value


def assert_unauthorized(err: ApiError) -> None:
    assert (err.status, err.message, err.type, err.headers) == (
        401,
        "Unauthorized",
        "unauthorized",
        {},
    )


def assert_locked(err: ApiError, retry_after: int) -> None:
    assert (err.status, err.message, err.type) == (429, RATE_LIMITED, "rate_limited")
    assert err.headers == {"Retry-After": str(retry_after)}


# --- bearer parsing and comparison ------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"Bearer {SECRET}", SECRET),
        (f"bearer {SECRET}", SECRET),
        (f"BEARER {SECRET}", SECRET),
        (f"  Bearer   {SECRET}  ", SECRET),
        (f"Bearer\t{SECRET}", SECRET),
        ("Bearer a b", "a b"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer   ", None),
        (SECRET, None),
        (f"Basic {SECRET}", None),
        (f"Bearer{SECRET}", None),
        (f"Token {SECRET}", None),
    ],
)
def test_parse_bearer(header: str | None, expected: str | None) -> None:
    assert parse_bearer(header) == expected


def test_secrets_equal() -> None:
    assert secrets_equal("abc", "abc")
    assert not secrets_equal("abc", "abd")
    assert not secrets_equal("abc", "abcd")
    assert not secrets_equal("", "abc")
    assert secrets_equal("ünïcødé", "ünïcødé")


@pytest.mark.parametrize(
    ("ip", "key", "loopback"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.8.9.10", "127.8.9.10", True),
        ("::1", "::1", True),
        ("[::1]", "::1", True),
        ("::ffff:127.0.0.1", "127.0.0.1", True),
        ("::ffff:10.0.0.1", "10.0.0.1", False),
        ("10.0.0.1", "10.0.0.1", False),
        ("2001:DB8::1", "2001:db8::1", False),
        ("fe80::1%eth0", "fe80::1", False),
        ("localhost", "localhost", False),
        ("testclient", "testclient", False),
        (None, "unknown", False),
        ("", "unknown", False),
    ],
)
def test_normalize_client_ip(ip: str | None, key: str, loopback: bool) -> None:
    assert normalize_client_ip(ip) == (key, loopback)


# --- token mode -------------------------------------------------------------------


def test_right_token_passes(clock: FakeClock) -> None:
    auth = Authenticator(make_settings(), clock)
    auth.check(f"Bearer {SECRET}", REMOTE)
    auth.check(f"bearer {SECRET}", REMOTE)
    auth.check(f"  BEARER {SECRET} ", None)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        f"Bearer {SECRET}x",
        f"Bearer {SECRET[:-1]}",
        f"Basic {SECRET}",
        SECRET,
        f"Bearer {SECRET.upper()}",
    ],
)
def test_missing_wrong_or_malformed_bearer_is_401(clock: FakeClock, header: str | None) -> None:
    auth = Authenticator(make_settings(), clock)
    assert_unauthorized(raises(auth, header))


def test_token_from_env(clock: FakeClock) -> None:
    settings = make_settings({}, env={"OPENCLAW_GATEWAY_TOKEN": "from-env"})
    auth = Authenticator(settings, clock)
    auth.check("Bearer from-env", REMOTE)
    assert_unauthorized(raises(auth, f"Bearer {SECRET}"))


def test_token_mode_does_not_accept_the_password(clock: FakeClock) -> None:
    auth = Authenticator(make_settings({"mode": "token", "token": "t", "password": "p"}), clock)
    auth.check("Bearer t", REMOTE)
    assert_unauthorized(raises(auth, "Bearer p"))


# --- password mode ----------------------------------------------------------------


def test_password_mode(clock: FakeClock) -> None:
    auth = Authenticator(make_settings({"mode": "password", "password": "pw", "token": "t"}), clock)
    auth.check("Bearer pw", REMOTE)
    auth.verify_secret("pw", REMOTE)
    assert_unauthorized(raises(auth, "Bearer t"))


def test_inferred_password_mode(clock: FakeClock) -> None:
    auth = Authenticator(make_settings({"password": "pw"}), clock)
    auth.check("Bearer pw", REMOTE)
    assert_unauthorized(raises(auth, "Bearer nope"))


def test_password_from_env(clock: FakeClock) -> None:
    settings = make_settings({"mode": "password"}, env={"OPENCLAW_GATEWAY_PASSWORD": "envpw"})
    Authenticator(settings, clock).check("Bearer envpw", REMOTE)


# --- mode none / misconfiguration -------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer anything", "garbage"])
def test_mode_none_always_passes(clock: FakeClock, header: str | None) -> None:
    auth = Authenticator(make_settings({}), clock)
    for _ in range(50):
        auth.check(header, REMOTE)
        auth.verify_secret(None, REMOTE)


def test_token_mode_without_secret_fails_closed(clock: FakeClock) -> None:
    auth = Authenticator(make_settings({"mode": "token"}), clock)
    assert_unauthorized(raises(auth, "Bearer "))
    assert_unauthorized(raises(auth, "Bearer anything"))


# --- verify_secret (WebSocket path) -----------------------------------------------


def test_verify_secret(clock: FakeClock) -> None:
    auth = Authenticator(make_settings(), clock)
    auth.verify_secret(SECRET, REMOTE)
    for presented in (None, "", "wrong"):
        with pytest.raises(ApiError) as info:
            auth.verify_secret(presented, REMOTE)
        assert_unauthorized(info.value)


def test_verify_secret_shares_lockout_with_http(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=2), clock)
    raises(auth, "Bearer wrong")
    with pytest.raises(ApiError):
        auth.verify_secret("wrong", REMOTE)
    with pytest.raises(ApiError) as info:
        auth.verify_secret(SECRET, REMOTE)
    assert_locked(info.value, 300)
    assert_locked(raises(auth, f"Bearer {SECRET}"), 300)


# --- lockout ----------------------------------------------------------------------


def test_lockout_after_max_attempts(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=3, lockout=300), clock)
    for _ in range(2):
        assert_unauthorized(raises(auth, "Bearer wrong"))
        clock.advance(1)
    # The third wrong secret still gets 401 and starts the lockout (t = 2).
    assert_unauthorized(raises(auth, "Bearer wrong"))
    clock.advance(2)
    # Locked: even the right secret gets 429, with the remaining time.
    assert_locked(raises(auth, f"Bearer {SECRET}"), 298)
    assert_locked(raises(auth, None), 298)
    clock.advance(100.5)
    assert_locked(raises(auth, "Bearer wrong"), 198)  # 197.5 rounded up
    clock.advance(197.4)
    assert_locked(raises(auth, f"Bearer {SECRET}"), 1)  # 0.1 s left: at least 1
    clock.advance(0.1)
    auth.check(f"Bearer {SECRET}", REMOTE)


def test_default_rate_limit_is_ten_attempts_and_five_minutes(clock: FakeClock) -> None:
    auth = Authenticator(make_settings(), clock)
    for _ in range(10):
        assert_unauthorized(raises(auth, "Bearer wrong"))
    assert_locked(raises(auth, f"Bearer {SECRET}"), 300)


def test_lockout_expiry_starts_a_fresh_count(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=2, lockout=10), clock)
    raises(auth, "Bearer wrong")
    raises(auth, "Bearer wrong")
    assert raises(auth, "Bearer wrong").status == 429
    clock.advance(10)
    assert_unauthorized(raises(auth, "Bearer wrong"))  # count restarted: 1 of 2
    auth.check(f"Bearer {SECRET}", REMOTE)


def test_failures_slide_out_of_the_window(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=3, window=60), clock)
    raises(auth, "Bearer wrong")  # t=0
    clock.advance(30)
    raises(auth, "Bearer wrong")  # t=30
    clock.advance(31)  # t=61: the first failure has left the window
    assert_unauthorized(raises(auth, "Bearer wrong"))  # 2 in window
    assert_unauthorized(raises(auth, "Bearer wrong"))  # 3 in window → locked now
    assert raises(auth, f"Bearer {SECRET}").status == 429


def test_failure_exactly_window_old_has_expired(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=2, window=60), clock)
    raises(auth, "Bearer wrong")
    clock.advance(60)
    raises(auth, "Bearer wrong")
    auth.check(f"Bearer {SECRET}", REMOTE)


def test_success_resets_the_count(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=3), clock)
    raises(auth, "Bearer wrong")
    raises(auth, "Bearer wrong")
    auth.check(f"Bearer {SECRET}", REMOTE)
    assert auth.tracked_clients == 0
    raises(auth, "Bearer wrong")
    raises(auth, "Bearer wrong")
    auth.check(f"Bearer {SECRET}", REMOTE)  # would be locked without the reset


def test_missing_credentials_are_not_counted(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=2), clock)
    for header in (None, "", "Bearer", "Basic abc", "garbage") * 5:
        assert_unauthorized(raises(auth, header))
    assert auth.tracked_clients == 0
    auth.check(f"Bearer {SECRET}", REMOTE)


def test_lockout_is_per_ip(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=2), clock)
    raises(auth, "Bearer wrong", REMOTE)
    raises(auth, "Bearer wrong", REMOTE)
    assert raises(auth, f"Bearer {SECRET}", REMOTE).status == 429
    auth.check(f"Bearer {SECRET}", OTHER)
    assert_unauthorized(raises(auth, "Bearer wrong", OTHER))


def test_ipv4_mapped_address_shares_the_ipv4_counter(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=2), clock)
    raises(auth, "Bearer wrong", "10.1.2.3")
    raises(auth, "Bearer wrong", "::ffff:10.1.2.3")
    assert raises(auth, f"Bearer {SECRET}", "10.1.2.3").status == 429


def test_unknown_client_is_counted(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=1), clock)
    raises(auth, "Bearer wrong", None)
    assert raises(auth, f"Bearer {SECRET}", None).status == 429


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.255.0.3", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_exempt(clock: FakeClock, ip: str) -> None:
    auth = Authenticator(limited(max_attempts=2), clock)
    for _ in range(20):
        assert_unauthorized(raises(auth, "Bearer wrong", ip))
    assert auth.tracked_clients == 0
    auth.check(f"Bearer {SECRET}", ip)


# --- bounded memory ---------------------------------------------------------------


def test_tracked_clients_are_bounded(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=5), clock, max_tracked=100)
    for i in range(1000):
        raises(auth, "Bearer wrong", f"10.0.{i // 256}.{i % 256}")
        assert auth.tracked_clients <= 100
    assert auth.tracked_clients == 100


def test_eviction_spares_active_lockouts(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=2), clock, max_tracked=10)
    raises(auth, "Bearer wrong", REMOTE)
    raises(auth, "Bearer wrong", REMOTE)  # REMOTE locked, and the oldest record
    for i in range(50):
        raises(auth, "Bearer wrong", f"10.9.0.{i}")
    assert auth.tracked_clients <= 10
    assert raises(auth, f"Bearer {SECRET}", REMOTE).status == 429


def test_stale_records_are_pruned_before_evicting(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=3, window=60), clock, max_tracked=3)
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        raises(auth, "Bearer wrong", ip)
    clock.advance(61)
    raises(auth, "Bearer wrong", "10.0.0.4")
    assert auth.tracked_clients == 1


def test_eviction_when_everything_is_locked_keeps_the_bound(clock: FakeClock) -> None:
    auth = Authenticator(limited(max_attempts=1), clock, max_tracked=3)
    for i in range(10):
        raises(auth, "Bearer wrong", f"10.0.0.{i}")
        assert auth.tracked_clients <= 3
    assert raises(auth, f"Bearer {SECRET}", "10.0.0.9").status == 429


# --- errors module ------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


@pytest.mark.parametrize(
    ("err", "status", "message", "type_"),
    [
        (errors.unauthorized(), 401, "Unauthorized", "unauthorized"),
        (errors.rate_limited(12.2), 429, RATE_LIMITED, "rate_limited"),
        (errors.payload_too_large(), 413, "Payload too large", "invalid_request_error"),
        (errors.invalid_request("Bad."), 400, "Bad.", "invalid_request_error"),
        (errors.no_worker(), 503, "No agent worker available.", "api_error"),
        (errors.model_not_found("x"), 404, "Model 'x' not found.", "invalid_request_error"),
    ],
)
def test_error_helpers(err: ApiError, status: int, message: str, type_: str) -> None:
    assert (err.status, err.message, err.type) == (status, message, type_)
    assert str(err) == message
    envelope = err.envelope()
    jsonschema.validate(envelope, _schema())
    assert envelope == {
        "error": {"message": message, "type": type_, "param": None, "code": err.code}
    }


def test_envelope_with_code_validates() -> None:
    err = errors.from_run_failure(429, "rate_limit_error", "slow down", "rate_limit_exceeded")
    jsonschema.validate(err.envelope(), _schema())
    assert err.envelope()["error"]["code"] == "rate_limit_exceeded"


def test_envelope_is_json_serialisable() -> None:
    assert json.loads(json.dumps(errors.no_worker().envelope()))["error"]["code"] is None


@pytest.mark.parametrize(
    ("seconds", "header"), [(0, "1"), (0.01, "1"), (1, "1"), (1.01, "2"), (299.5, "300"), (-5, "1")]
)
def test_retry_after_rounds_up_and_is_at_least_one(seconds: float, header: str) -> None:
    assert errors.rate_limited(seconds).headers == {"Retry-After": header}


def test_retry_after_non_finite() -> None:
    assert errors.rate_limited(float("nan")).headers == {"Retry-After": "1"}


def test_headers_are_copied() -> None:
    source = {"X-A": "1"}
    err = ApiError(400, "m", headers=source)
    source["X-B"] = "2"
    assert err.headers == {"X-A": "1"}
    assert ApiError(400, "m").headers == {}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((500, "api_error", "boom", None), (500, "boom", "api_error", None)),
        (
            (401, "authentication_error", "bad key", None),
            (401, "bad key", "authentication_error", None),
        ),
        ((429, "rate_limit_error", "slow", "x"), (429, "slow", "rate_limit_error", "x")),
        ((502, "api_error", "upstream down", None), (502, "upstream down", "api_error", None)),
        ((504, "api_error", "upstream slow", None), (504, "upstream slow", "api_error", None)),
        ((200, "api_error", "odd", None), (500, "odd", "api_error", None)),
        ((0, "", "", ""), (500, "internal error", "api_error", None)),
    ],
)
def test_from_run_failure(
    args: tuple[int, str, str, str | None], expected: tuple[int, str, str, str | None]
) -> None:
    err = errors.from_run_failure(*args)
    assert (err.status, err.message, err.type, err.code) == expected
    jsonschema.validate(err.envelope(), _schema())


def test_from_run_failure_retry_after() -> None:
    err = errors.from_run_failure(429, "rate_limit_error", "slow", None, retry_after=2.5)
    assert err.headers == {"Retry-After": "3"}
    assert errors.from_run_failure(429, "rate_limit_error", "slow", None).headers == {}
    assert errors.from_run_failure(503, "api_error", "x", None, retry_after=0).headers == {
        "Retry-After": "1"
    }
