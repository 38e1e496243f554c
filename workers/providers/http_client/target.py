"""Where a URL's requests go: the origin, the proxy in between, and the request head
up to the content length, worked out once per URL."""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass

from .errors import ConnectError
from .tunnel import connect_request


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    tls: bool  # https://: TLS to the proxy itself
    authorization: str | None  # the Proxy-Authorization value


@dataclass(frozen=True, slots=True)
class Target:
    key: tuple[str, str, int]  # the pool: scheme, host, port
    host: str  # the origin's, for TLS (SNI and the certificate check)
    tls: bool  # TLS with the origin
    head: bytes  # the request head up to the content-length value
    connect_host: str  # the proxy's, when there is one
    connect_port: int
    connect_tls: str | None  # the server name for TLS on the TCP connection itself
    tunnel: bytes | None  # the CONNECT request, for https through a proxy


def parse_proxy(url: str) -> Proxy:
    """An ``http(s)://[user:password@]host[:port]`` proxy URL (scheme http if none);
    ValueError for anything else."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid proxy {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"unsupported proxy {url!r}: only http:// and https:// proxies are")
    authorization = None
    if parts.username is not None:
        credentials = (f"{urllib.parse.unquote(parts.username)}:"
                       f"{urllib.parse.unquote(parts.password or '')}")
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    tls = parts.scheme == "https"
    return Proxy(parts.hostname, port or (443 if tls else 80), tls, authorization)


def build_target(url: str, proxy: Proxy | None, headers: bytes) -> Target:
    """The :class:`Target` of a POST to ``url``; ``headers`` are the client's own,
    ready to send. ConnectError if ``url`` is not an http(s) URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        port_given = parts.port
    except ValueError as exc:  # e.g. a port that is not a number
        raise ConnectError(f"invalid upstream URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectError(f"invalid upstream URL {url!r}: not http(s)://host/…")
    tls = parts.scheme == "https"
    host = parts.hostname
    port = port_given or (443 if tls else 80)
    authority = f"[{host}]" if ":" in host else host
    if port_given is not None:
        authority += f":{port}"
    path = _request_target((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    key = (parts.scheme, host, port)
    if proxy is None:
        return Target(key, host, tls, _head(path, authority, headers), host, port,
                      host if tls else None, None)
    connect_tls = proxy.host if proxy.tls else None
    if tls:  # a tunnel: the proxy sees only CONNECT, the origin the request
        hostport = authority if port_given is not None else f"{authority}:{port}"
        return Target(key, host, tls, _head(path, authority, headers), proxy.host,
                      proxy.port, connect_tls, connect_request(hostport, proxy.authorization))
    credentials = (b"proxy-authorization: %s\r\n" % proxy.authorization.encode("latin-1")
                   if proxy.authorization else b"")
    head = _head(f"http://{authority}{path}", authority, credentials + headers)  # absolute form
    return Target(key, host, tls, head, proxy.host, proxy.port, connect_tls, None)


def _head(path: str, authority: str, headers: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: %s\r\n%scontent-length: "
            % (path.encode("ascii"), authority.encode("idna"), headers))


def _request_target(target: str) -> str:
    """Percent-encode what may not appear raw in a request target (non-ASCII,
    spaces); what is already encoded or reserved stays as it is."""
    return urllib.parse.quote(target, safe="/?#[]@!$&'()*+,;=:%~-._")
