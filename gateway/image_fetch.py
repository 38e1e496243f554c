"""Fetching an image URL for a chat request without reaching anything internal (SPEC §8).

The guard against server-side request forgery:

- A host name is resolved once, by :class:`_VettingResolver`, which aiohttp's
  connector calls instead of its own: every address the name resolves to must be
  global (:func:`address_problem`), or the fetch is refused before any
  connection is made; aiohttp then connects only to the addresses the resolver
  returned, so a second, different answer (DNS rebinding) cannot be dialled.
  The ``Host`` header and TLS server name stay the URL's host.
- An IP literal host, which aiohttp connects to without resolving, is checked
  before the request; the legacy numeric forms ``inet_aton`` accepts
  (``2130706433``, ``0x7f.1``, ``127.1``) are refused outright.
- Redirects are followed here, not by aiohttp, and every hop is checked again:
  scheme, credentials, allowlist, address.
- The session ignores the ``*_proxy`` environment (aiohttp's ``trust_env=False``):
  a proxy would resolve and connect on its own, past the guard.

The image's type is the response's ``Content-Type``; when that is missing or
generic (``application/octet-stream``) it is sniffed from the first bytes
(PNG, JPEG, GIF and WebP signatures). Either way it must be an allowed MIME type.
Compressed responses are not accepted (``Accept-Encoding: identity``), so that
``maxBytes`` bounds what is held in memory, not what is inflated from it.

Exceptions here::

    FetchError              str() is the reason, shown to the client after the part's name
      ImageTooLarge         the body went past the limit (``limit`` attribute)
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from clawbus.config import ImagesConfig

Lookup = Callable[[str], Awaitable[Sequence[str]]]
Route = Callable[[str], tuple[str, int]]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_GENERIC_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
_CHUNK = 64 * 1024
# Ranges Python's ipaddress counts as global that must not be fetched from anyway.
_ALSO_INTERNAL: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (ipaddress.IPv4Network("100.64.0.0/10"), "CGNAT"),
    (ipaddress.IPv4Network("192.0.0.0/24"), "reserved"),
)


class FetchError(Exception):
    """An image URL gave no usable image; ``str()`` is the reason, e.g.
    ``image URL is blocked (loopback address)``."""


class ImageTooLarge(FetchError):
    """The image is larger than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"image is larger than {limit} bytes")
        self.limit = limit


def blocked(reason: str) -> FetchError:
    return FetchError(f"image URL is blocked ({reason})")


def mime_not_allowed(mime: str, allowed: Sequence[str]) -> FetchError:
    return FetchError(f"image type '{mime}' is not allowed (allowed: {', '.join(allowed)})")


def normal_mime(text: str) -> str:
    """``Image/PNG; charset=x`` → ``image/png``."""
    return text.partition(";")[0].strip().lower()


def address_problem(text: str) -> str | None:
    """Why an address must not be fetched from (``"loopback address"``), None for a
    global one. IPv4-mapped and 6to4 IPv6 addresses are judged by the IPv4 address
    they carry."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        carried = ip.ipv4_mapped or ip.sixtofour
        if carried is not None:
            return address_problem(str(carried))
    kinds = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        *((name, isinstance(ip, ipaddress.IPv4Address) and ip in net)
          for net, name in _ALSO_INTERNAL),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-global", not ip.is_global),
    )
    return next((f"{kind} address" for kind, hit in kinds if hit), None)


def host_allowed(host: str, allowlist: Sequence[str]) -> bool:
    """Whether ``host`` matches an allowlist entry: the same host, or a name below
    ``suffix`` for ``*.suffix``. An empty allowlist allows every host."""
    host = host.lower().rstrip(".")
    return not allowlist or any(
        host.endswith(p[1:]) if p.startswith("*.") else host == p for p in allowlist)


def sniff_mime(head: bytes) -> str | None:
    """The image type the first bytes announce (PNG, JPEG, GIF, WebP), if any."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


async def system_lookup(host: str) -> list[str]:
    """The addresses the system resolver gives for ``host``."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Blocked(Exception):
    """Raised by the resolver inside aiohttp; caught by :meth:`ImageFetcher.fetch`."""


class _VettingResolver(AbstractResolver):
    """Resolves with ``lookup``, refuses the host unless every address is global,
    and gives aiohttp the vetted addresses (through ``route``, a test hook)."""

    def __init__(self, lookup: Lookup, route: Route | None) -> None:
        self._lookup = lookup
        self._route = route

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        addresses = list(await self._lookup(host))
        if not addresses:
            raise OSError(f"no address for {host}")
        for address in addresses:
            problem = address_problem(address)
            if problem is not None:
                raise _Blocked(problem)
        results: list[ResolveResult] = []
        for address in addresses:
            dial_host, dial_port = self._route(address) if self._route else (address, port)
            results.append(ResolveResult(
                hostname=host, host=dial_host, port=dial_port,
                family=socket.AF_INET6 if ":" in dial_host else socket.AF_INET,
                proto=0, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        return results

    async def close(self) -> None:
        """Nothing to release: lookups are the caller's."""


@dataclass(frozen=True, slots=True)
class Fetched:
    mime: str
    data: bytes


class ImageFetcher:
    """Fetches image URLs under :class:`~clawbus.config.ImagesConfig`'s limits,
    through one aiohttp session, opened on first use and closed by :meth:`aclose`."""

    def __init__(self, config: ImagesConfig, *, lookup: Lookup | None = None,
                 route: Route | None = None, tls: ssl.SSLContext | None = None) -> None:
        self._config = config
        self._lookup = lookup or system_lookup
        self._route = route
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=_VettingResolver(self._lookup, self._route),
                use_dns_cache=False, ssl=self._tls if self._tls is not None else True)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar(),
                headers={"Accept": ", ".join(self._config.allowed_mimes),
                         "Accept-Encoding": "identity"})
        return self._session

    async def aclose(self) -> None:
        """Close the session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def fetch(self, url: str, limit: int) -> Fetched:
        """The image at ``url``, at most ``limit`` bytes, within ``timeoutMs`` for
        all hops. Raises :class:`FetchError` (:class:`ImageTooLarge` past ``limit``)."""
        timeout_ms = self._config.timeout_ms
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                return await self._follow(url, limit)
        except TimeoutError:
            raise FetchError(f"image URL fetch failed (timed out after {timeout_ms} ms)") from None
        except _Blocked as exc:
            raise blocked(str(exc)) from None
        except aiohttp.ClientConnectorDNSError:
            raise FetchError("image URL fetch failed (cannot resolve the host)") from None
        except aiohttp.ClientSSLError:
            raise FetchError("image URL fetch failed (TLS error)") from None
        except aiohttp.ClientConnectorError:
            raise FetchError("image URL fetch failed (cannot connect)") from None
        except aiohttp.ClientError as exc:
            raise FetchError(f"image URL fetch failed ({type(exc).__name__})") from None

    async def _follow(self, url: str, limit: int) -> Fetched:
        target = self._checked(url)
        session = self._open()
        for _ in range(self._config.max_redirects + 1):
            async with session.get(target, allow_redirects=False) as response:
                location = response.headers.get("Location")
                if response.status in _REDIRECTS and location is not None:
                    target = self._checked(_join(target, location))
                    continue
                return await self._read(response, limit)
        raise FetchError(
            f"image URL fetch failed (more than {self._config.max_redirects} redirects)")

    def _checked(self, url: str | URL) -> URL:
        """``url`` parsed, if it may be requested at all; the address check of a
        host name comes later, in the resolver."""
        try:
            parsed = url if isinstance(url, URL) else URL(url)
            host = parsed.raw_host
        except (ValueError, TypeError):
            raise FetchError("bad image URL") from None
        if parsed.scheme not in ("http", "https"):
            raise FetchError(f"unsupported image URL scheme '{parsed.scheme}'")
        if not host:
            raise FetchError("bad image URL (no host)")
        if parsed.user is not None or parsed.password is not None:
            raise blocked("credentials in the URL")
        if not host_allowed(host, self._config.url_allowlist):
            raise blocked("host not in urlAllowlist")
        problem = _literal_problem(host)
        if problem is not None:
            raise blocked(problem)
        return parsed

    async def _read(self, response: aiohttp.ClientResponse, limit: int) -> Fetched:
        if not 200 <= response.status < 300:
            raise FetchError(f"image URL fetch failed (HTTP {response.status})")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise FetchError(f"image URL fetch failed (Content-Encoding '{encoding}')")
        declared = normal_mime(response.headers.get("Content-Type", ""))
        generic = not declared or declared in _GENERIC_TYPES
        allowed = self._config.allowed_mimes
        if not generic and declared not in allowed:
            raise mime_not_allowed(declared, allowed)
        if response.content_length is not None and response.content_length > limit:
            raise ImageTooLarge(limit)
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > limit:
                raise ImageTooLarge(limit)
        if not body:
            raise FetchError("image URL fetch failed (empty response)")
        mime = sniff_mime(bytes(body[:16])) if generic else declared
        if mime is None or mime not in allowed:
            raise mime_not_allowed(mime or declared or "unknown", allowed)
        return Fetched(mime, bytes(body))


def _join(base: URL, location: str) -> URL:
    try:
        return base.join(URL(location))
    except (ValueError, TypeError):
        raise FetchError("image URL fetch failed (bad redirect Location)") from None


def _literal_problem(host: str) -> str | None:
    """Why an IP literal host must not be fetched from; None for a host name (its
    addresses are checked once resolved) or a global address."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return address_problem(host)
    try:
        socket.inet_aton(host)
    except OSError:
        return None
    return "non-canonical IP address"
