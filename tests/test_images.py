"""Image parts of chat requests (SPEC §8): gateway.images and gateway.image_fetch.

URL fetches go to a real aiohttp server on a free loopback port. Public-looking
hosts reach it through the resolver's test hooks: ``lookup`` makes
``img.example`` resolve to a global address and ``route`` dials that address on
the local server, so the address guard judges what DNS said, as in production.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from bus.messages import ImagePart
from clawbus.config import ConfigError, ImagesConfig, load_settings, parse_settings
from gateway.errors import ApiError
from gateway.image_fetch import address_problem, host_allowed, sniff_mime
from gateway.images import (
    MAX_IMAGES,
    MAX_TOTAL_BYTES,
    ImageResolver,
    ImageSource,
    image_source,
)

BOTH_LOOPS = True  # tests/conftest.py: asyncio and uvloop

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PUBLIC_IP = "93.184.216.34"
WHERE = "messages[1].content[0]"


def data_uri(body: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(body).decode()}"


def source(url: str, where: str = WHERE, detail: str | None = None) -> ImageSource:
    return ImageSource(where, url, detail)


# -- a real image server ------------------------------------------------------------------


@dataclass
class ImageServer:
    """aiohttp.web on a free 127.0.0.1 port; ``seen`` logs (path with query, Host)."""

    port: int = 0
    seen: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _routes(release: asyncio.Event) -> dict[str, Handler]:
    async def cat(request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG, content_type="image/png")

    async def octet(request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG)  # application/octet-stream: sniffed

    async def untyped(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(PNG)
        await response.prepare(request)
        await response.write(PNG)
        return response

    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html></html>", content_type="text/html")

    async def missing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="no")

    async def declared_big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG * 200, content_type="image/png")

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(1024):  # 64 MiB offered; the client must stop long before
                await response.write(PNG * 64)
        except ConnectionError:
            pass
        return response

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=PNG, content_type="image/png")

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.query["to"])

    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/loop")

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG, content_type="image/png",
                            headers={"Content-Encoding": "gzip"})

    return {"/cat.png": cat, "/octet": octet, "/untyped": untyped, "/page.html": page,
            "/missing": missing, "/declared-big": declared_big, "/endless": endless,
            "/slow": slow, "/redirect": redirect, "/loop": loop, "/gzipped": gzipped}


@contextlib.asynccontextmanager
async def _serve(tls: ssl.SSLContext | None = None) -> AsyncIterator[ImageServer]:
    release = asyncio.Event()
    server = ImageServer()

    @web.middleware
    async def log(request: web.Request, handler: Handler) -> web.StreamResponse:
        server.seen.append((request.path_qs, request.headers.get("Host", "")))
        return await handler(request)

    app = web.Application(middlewares=[log])
    for path, handler in _routes(release).items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server.port = sock.getsockname()[1]
    await web.SockSite(runner, sock, ssl_context=tls).start()
    try:
        yield server
    finally:
        release.set()
        await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    async with _serve() as running:
        yield running


Make = Callable[..., ImageResolver]


@pytest.fixture
async def make(server: ImageServer) -> AsyncIterator[Make]:
    """``make(lookup_table, **config)``: a resolver whose ``lookup`` answers from the
    table (default: img.example and cdn.example.org → PUBLIC_IP) and whose ``route``
    dials PUBLIC_IP on the test server; closed after the test."""
    made: list[ImageResolver] = []

    def factory(table: dict[str, list[str]] | None = None, *, system_dns: bool = False,
                tls: ssl.SSLContext | None = None, **config: Any) -> ImageResolver:
        answers = table if table is not None else {
            "img.example": [PUBLIC_IP], "cdn.example.org": [PUBLIC_IP]}

        async def lookup(host: str) -> list[str]:
            host = host.rstrip(".")  # what DNS does with a fully-qualified name
            if host not in answers:
                raise socket.gaierror(socket.EAI_NONAME, "unknown host")
            return answers[host]

        def route(address: str) -> tuple[str, int]:
            assert address == PUBLIC_IP, f"dialling {address}, which the guard should refuse"
            return "127.0.0.1", server.port

        config.setdefault("allow_url", True)
        resolver = ImageResolver(ImagesConfig(**config), lookup=None if system_dns else lookup,
                                 route=route, tls=tls)
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        await resolver.aclose()


async def refused(resolver: ImageResolver, url: str | Sequence[ImageSource]) -> str:
    """The 400 message for the sources (or one URL), checked to name its part."""
    sources = [source(url)] if isinstance(url, str) else url
    with pytest.raises(ApiError) as info:
        await resolver.resolve(sources)
    error = info.value
    assert (error.status, error.type) == (400, "invalid_request_error")
    assert error.message.startswith("`messages[") and error.message.endswith(".")
    return error.message


async def fetched(resolver: ImageResolver, url: str) -> ImagePart:
    (part,) = await resolver.resolve([source(url)])
    return part


# -- image_source ------------------------------------------------------------------------


def test_image_source_reads_image_url_and_input_image_parts() -> None:
    assert image_source({"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}},
                        "m[0]") == ImageSource("m[0]", "data:x", "low")
    assert image_source({"type": "image_url", "image_url": {"url": " https://a/b "}},
                        "m[1]") == ImageSource("m[1]", "https://a/b", None)
    assert image_source({"type": "input_image", "image_url": "https://a/b", "detail": "high"},
                        "m[2]") == ImageSource("m[2]", "https://a/b", "high")
    assert image_source({"type": "input_image", "image_url": {"url": "https://a/b"}},
                        "m[3]") == ImageSource("m[3]", "https://a/b", None)


@pytest.mark.parametrize("part", [
    {"type": "image_url"},
    {"type": "image_url", "image_url": {}},
    {"type": "image_url", "image_url": {"url": 5}},
    {"type": "image_url", "image_url": {"url": ""}},
    {"type": "input_image", "image_url": None},
    {"type": "input_image", "file_id": "file-1"},
])
def test_image_source_without_a_url_is_a_400_naming_the_part(part: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        image_source(part, "messages[2].content[1]")
    assert info.value.status == 400
    assert info.value.message == ("`messages[2].content[1]`: image_url.url must be a data URI "
                                  "or an http(s) URL.")


def test_image_source_detail_must_be_a_string() -> None:
    with pytest.raises(ApiError) as info:
        image_source({"type": "image_url", "image_url": {"url": "data:x", "detail": 1}}, "p")
    assert info.value.message == "`p`: image_url.detail must be a string."


# -- data URIs ---------------------------------------------------------------------------


async def test_data_uri_bytes_round_trip() -> None:
    resolver = ImageResolver(ImagesConfig())
    uri = data_uri(PNG)
    spaced = "DATA:Image/PNG;charset=utf-8;BASE64," + "\n ".join(
        uri.split(",", 1)[1][i:i + 60] for i in range(0, len(uri), 60))
    unpadded = data_uri(PNG[:-1]).rstrip("=")
    parts = await resolver.resolve([source(uri, detail="low"), source(spaced),
                                    source(unpadded)])
    assert [p.mime for p in parts] == ["image/png"] * 3
    assert [base64.b64decode(p.data, validate=True) for p in parts] == [PNG, PNG, PNG[:-1]]
    assert [p.size for p in parts] == [len(PNG), len(PNG), len(PNG) - 1]
    assert parts[0].detail == "low" and parts[1].detail is None
    assert parts[0].data == parts[1].data  # whitespace gone
    assert parts[2].data.endswith("=")  # padding put back
    await resolver.aclose()


@pytest.mark.parametrize(("url", "reason"), [
    ("data:image/png,AAAA", "bad data URI (not base64-encoded)"),
    ("data:image/png;base64", "bad data URI (expected data:<mime>;base64,<data>)"),
    ("data:;base64,AAAA", "bad data URI (expected data:<mime>;base64,<data>)"),
    ("data:png;base64,AAAA", "bad data URI (expected data:<mime>;base64,<data>)"),
    ("data:image/png;base64,not base64!", "bad data URI (invalid base64)"),
    ("data:image/png;base64,A", "bad data URI (invalid base64)"),
    ("data:image/png;base64,AA=A", "bad data URI (invalid base64)"),
    ("data:image/png;base64,-_-_", "bad data URI (invalid base64)"),
    ("data:image/png;base64,ÄÄÄÄ", "bad data URI (invalid base64)"),
    ("data:image/png;base64,", "bad data URI (no data)"),
    ("data:image/bmp;base64,AAAA", "image type 'image/bmp' is not allowed "
                                   "(allowed: image/jpeg, image/png, image/gif, image/webp)"),
    ("data:text/plain;base64,AAAA", "image type 'text/plain' is not allowed "
                                    "(allowed: image/jpeg, image/png, image/gif, image/webp)"),
    ("ftp://img.example/cat.png", "unsupported image URL scheme 'ftp'"),
    ("file:///etc/passwd", "unsupported image URL scheme 'file'"),
    ("cat.png", "bad image URL (a data URI or an http(s) URL)"),
])
async def test_data_uri_and_scheme_errors(url: str, reason: str) -> None:
    resolver = ImageResolver(ImagesConfig())
    assert await refused(resolver, url) == f"`{WHERE}`: {reason}."
    await resolver.aclose()


async def test_allowed_mimes_are_configurable() -> None:
    resolver = ImageResolver(ImagesConfig(allowed_mimes=("image/bmp",)))
    (part,) = await resolver.resolve([source(data_uri(b"BM..", "image/bmp"))])
    assert part.mime == "image/bmp"
    assert "image type 'image/png' is not allowed (allowed: image/bmp)" in await refused(
        resolver, data_uri(PNG))


async def test_at_most_eight_images() -> None:
    resolver = ImageResolver(ImagesConfig())
    sources = [source(data_uri(PNG), f"messages[{i}].content[0]") for i in range(MAX_IMAGES)]
    assert len(await resolver.resolve(sources)) == MAX_IMAGES
    extra = [*sources, source("http://never.fetched/", "messages[8].content[0]")]
    assert await refused(resolver, extra) == (
        "`messages[8].content[0]`: too many images (at most 8 a request).")


async def test_twenty_megabytes_in_all() -> None:
    resolver = ImageResolver(ImagesConfig())
    seven = data_uri(b"\0" * (7 * 1024 * 1024))
    two = [source(seven, "messages[0].content[0]"), source(seven, "messages[0].content[1]")]
    assert sum(p.size for p in await resolver.resolve(two)) == 14 * 1024 * 1024
    three = [*two, source(seven, "messages[1].content[0]")]
    assert await refused(resolver, three) == (
        f"`messages[1].content[0]`: images are larger than {MAX_TOTAL_BYTES} bytes in all.")
    exactly = data_uri(b"\0" * (MAX_TOTAL_BYTES - 14 * 1024 * 1024))
    assert len(await resolver.resolve([*two, source(exactly)])) == 3


async def test_a_fetch_counts_against_the_total(make: Make) -> None:
    """What is left of the 20 MB, when less than maxBytes, bounds the download."""
    almost = data_uri(b"\0" * (MAX_TOTAL_BYTES - 1000), "image/gif")
    resolver = make()
    message = await refused(resolver, [source(almost, "messages[0].content[0]"),
                                       source("http://img.example/endless")])
    assert message == f"`{WHERE}`: images are larger than {MAX_TOTAL_BYTES} bytes in all."


# -- URL fetching ------------------------------------------------------------------------


async def test_url_fetching_is_disabled_by_default(server: ImageServer) -> None:
    resolver = ImageResolver(ImagesConfig())
    for url in ("http://img.example/cat.png", "HTTPS://img.example/cat.png"):
        assert await refused(resolver, url) == f"`{WHERE}`: image URL fetching is disabled."
    assert server.seen == []


async def test_fetch_through_the_vetted_address(make: Make, server: ImageServer) -> None:
    part = await fetched(make(), "http://img.example/cat.png?size=2")
    assert (part.mime, part.size) == ("image/png", len(PNG))
    assert base64.b64decode(part.data, validate=True) == PNG
    assert server.seen == [("/cat.png?size=2", "img.example")]  # Host: the URL's host


async def test_fetch_sniffs_a_generic_or_missing_content_type(make: Make) -> None:
    resolver = make()
    for path in ("/octet", "/untyped"):
        part = await fetched(resolver, f"http://img.example{path}")
        assert (part.mime, base64.b64decode(part.data)) == ("image/png", PNG)
    assert sniff_mime(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert sniff_mime(b"GIF89a") == "image/gif"
    assert sniff_mime(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert sniff_mime(b"<html>") is None


async def test_https_verifies_the_urls_host_not_the_dialled_address() -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("img.example").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    async with _serve(server_tls) as server:

        def route(address: str) -> tuple[str, int]:
            return "127.0.0.1", server.port

        async def lookup(host: str) -> list[str]:
            return [PUBLIC_IP]

        resolver = ImageResolver(ImagesConfig(allow_url=True), lookup=lookup, route=route,
                                 tls=client_tls)
        try:
            part = await fetched(resolver, "https://img.example/cat.png")
            assert base64.b64decode(part.data) == PNG
            assert server.seen == [("/cat.png", "img.example")]
            untrusted = ImageResolver(ImagesConfig(allow_url=True), lookup=lookup, route=route)
            try:
                assert await refused(untrusted, "https://img.example/cat.png") == (
                    f"`{WHERE}`: image URL fetch failed (TLS error).")
            finally:
                await untrusted.aclose()
        finally:
            await resolver.aclose()


async def test_one_lookup_a_connection_and_only_its_answer_is_dialled(
        server: ImageServer) -> None:
    """A rebinding DNS answer (public, then loopback) is never asked for twice."""
    answers = iter([[PUBLIC_IP], ["127.0.0.1"]])
    asked: list[str] = []

    async def lookup(host: str) -> list[str]:
        asked.append(host)
        return next(answers)

    dialled: list[str] = []

    def route(address: str) -> tuple[str, int]:
        dialled.append(address)
        return "127.0.0.1", server.port

    resolver = ImageResolver(ImagesConfig(allow_url=True), lookup=lookup, route=route)
    try:
        assert (await fetched(resolver, "http://img.example/cat.png")).size == len(PNG)
    finally:
        await resolver.aclose()
    assert (asked, dialled) == (["img.example"], [PUBLIC_IP])


@pytest.mark.parametrize("host", [
    "127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "[::]",
    "169.254.169.254", "10.0.0.5", "100.64.0.1", "[fe80::1]", "[fc00::1]",
])
async def test_an_internal_ip_literal_is_refused_before_any_connection(
        make: Make, server: ImageServer, host: str) -> None:
    message = await refused(make(), f"http://{host}:{server.port}/cat.png")
    assert message.startswith(f"`{WHERE}`: image URL is blocked (")
    assert server.seen == []


async def test_loopback_by_name_is_refused_after_dns(make: Make, server: ImageServer) -> None:
    """``localhost`` through the system resolver: its addresses are loopback."""
    message = await refused(make(system_dns=True), f"http://localhost:{server.port}/cat.png")
    assert message == f"`{WHERE}`: image URL is blocked (loopback address)."
    assert server.seen == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "0177.0.0.1", "0x7f000001"])
async def test_legacy_numeric_ip_forms_are_refused(
        make: Make, server: ImageServer, host: str) -> None:
    message = await refused(make(system_dns=True), f"http://{host}:{server.port}/cat.png")
    assert message == f"`{WHERE}`: image URL is blocked (non-canonical IP address)."
    assert server.seen == []


@pytest.mark.parametrize("url", [
    "http://img.example@127.0.0.1:{port}/cat.png",
    "http://127.0.0.1:{port}@img.example/cat.png",
    "http://user:secret@img.example/cat.png",
])
async def test_credentials_in_the_url_are_refused(
        make: Make, server: ImageServer, url: str) -> None:
    message = await refused(make(), url.format(port=server.port))
    assert message == f"`{WHERE}`: image URL is blocked (credentials in the URL)."
    assert server.seen == []


@pytest.mark.parametrize(("addresses", "kind"), [
    (["10.0.0.5"], "private"),
    ([PUBLIC_IP, "10.0.0.5"], "private"),
    (["10.0.0.5", PUBLIC_IP], "private"),
    ([PUBLIC_IP, "127.0.0.1"], "loopback"),
    (["::ffff:127.0.0.1"], "loopback"),
    (["2002:7f00:1::1"], "loopback"),  # 6to4 carrying 127.0.0.1
    (["::1"], "loopback"),
    (["169.254.169.254"], "link-local"),
    (["100.100.100.200"], "CGNAT"),
    (["224.0.0.1"], "multicast"),
])
async def test_a_host_resolving_to_any_internal_address_is_refused(
        make: Make, server: ImageServer, addresses: list[str], kind: str) -> None:
    resolver = make({"img.example": addresses})
    message = await refused(resolver, "http://img.example/cat.png")
    assert message == f"`{WHERE}`: image URL is blocked ({kind} address)."
    assert server.seen == []


@pytest.mark.parametrize(("address", "problem"), [
    ("93.184.216.34", None),
    ("2606:2800:220:1:248:1893:25c8:1946", None),
    ("::ffff:93.184.216.34", None),
    ("2002:5db8:d822::1", None),  # 6to4 carrying a global address
    ("0.0.0.0", "unspecified address"),
    ("::", "unspecified address"),
    ("127.0.0.2", "loopback address"),
    ("::ffff:10.1.2.3", "private address"),
    ("172.16.0.1", "private address"),
    ("192.168.1.1", "private address"),
    ("100.64.0.0", "CGNAT address"),
    ("192.0.0.8", "reserved address"),
    ("198.18.0.1", "private address"),
    ("192.0.2.1", "private address"),
    ("240.0.0.1", "private address"),
    ("255.255.255.255", "private address"),
    ("fe80::1%eth0", "link-local address"),
    ("fec0::1", "site-local address"),
    ("ff02::1", "multicast address"),
    ("fd12:3456::1", "private address"),
    ("64:ff9b::7f00:1", "reserved address"),
    ("::127.0.0.1", "reserved address"),
    ("2001:db8::1", "private address"),
    ("not-an-ip", "not an IP address"),
])
def test_address_problem(address: str, problem: str | None) -> None:
    assert address_problem(address) == problem


async def test_a_redirect_to_loopback_is_refused(make: Make, server: ImageServer) -> None:
    target = f"http://127.0.0.1:{server.port}/cat.png"
    message = await refused(make(), f"http://img.example/redirect?to={target}")
    assert message == f"`{WHERE}`: image URL is blocked (loopback address)."
    assert [path for path, _ in server.seen] == [f"/redirect?to={target}"]


async def test_a_redirect_to_a_host_resolving_inside_is_refused(
        make: Make, server: ImageServer) -> None:
    resolver = make({"img.example": [PUBLIC_IP], "internal.example": ["10.0.0.5"]})
    message = await refused(
        resolver, "http://img.example/redirect?to=http://internal.example/cat.png")
    assert message == f"`{WHERE}`: image URL is blocked (private address)."
    assert len(server.seen) == 1


async def test_a_relative_redirect_is_followed(make: Make, server: ImageServer) -> None:
    part = await fetched(make(), "http://img.example/redirect?to=/cat.png")
    assert base64.b64decode(part.data) == PNG
    assert [path for path, _ in server.seen] == ["/redirect?to=/cat.png", "/cat.png"]


async def test_too_many_redirects(make: Make, server: ImageServer) -> None:
    message = await refused(make(max_redirects=2), "http://img.example/loop")
    assert message == f"`{WHERE}`: image URL fetch failed (more than 2 redirects)."
    assert len(server.seen) == 3
    zero = await refused(make(max_redirects=0), "http://img.example/redirect?to=/cat.png")
    assert zero == f"`{WHERE}`: image URL fetch failed (more than 0 redirects)."


async def test_allowlist(make: Make, server: ImageServer) -> None:
    resolver = make(url_allowlist=("*.example.org", "img.example"))
    assert (await fetched(resolver, "http://CDN.example.org./cat.png")).size == len(PNG)
    assert (await fetched(resolver, "http://img.example/cat.png")).size == len(PNG)
    strict = make(url_allowlist=("*.example.org",))
    blocked = f"`{WHERE}`: image URL is blocked (host not in urlAllowlist)."
    assert await refused(strict, "http://img.example/cat.png") == blocked
    assert await refused(
        strict, "http://cdn.example.org/redirect?to=http://img.example/cat.png") == blocked
    assert len(server.seen) == 3
    assert host_allowed("a.b.example.org", ("*.example.org",))
    assert not host_allowed("example.org", ("*.example.org",))
    assert not host_allowed("badexample.org", ("*.example.org",))
    assert host_allowed("anything", ())


async def test_too_large_while_streaming(make: Make, server: ImageServer) -> None:
    message = await refused(make(max_bytes=100_000), "http://img.example/endless")
    assert message == f"`{WHERE}`: image is larger than 100000 bytes."


async def test_too_large_by_content_length(make: Make, server: ImageServer) -> None:
    message = await refused(make(max_bytes=len(PNG)), "http://img.example/declared-big")
    assert message == f"`{WHERE}`: image is larger than {len(PNG)} bytes."
    assert (await fetched(make(max_bytes=len(PNG)), "http://img.example/cat.png")).size == len(PNG)


async def test_timeout(make: Make, server: ImageServer) -> None:
    message = await refused(make(timeout_ms=200), "http://img.example/slow")
    assert message == f"`{WHERE}`: image URL fetch failed (timed out after 200 ms)."


@pytest.mark.parametrize(("path", "reason"), [
    ("/missing", "image URL fetch failed (HTTP 404)"),
    ("/page.html", "image type 'text/html' is not allowed "
                   "(allowed: image/jpeg, image/png, image/gif, image/webp)"),
    ("/gzipped", "image URL fetch failed (Content-Encoding 'gzip')"),
])
async def test_fetch_failures(make: Make, path: str, reason: str) -> None:
    assert await refused(make(), f"http://img.example{path}") == f"`{WHERE}`: {reason}."


async def test_an_unknown_host_fails(make: Make) -> None:
    message = await refused(make(), "http://nowhere.example/cat.png")
    assert message == f"`{WHERE}`: image URL fetch failed (cannot resolve the host)."


async def test_an_unsniffable_generic_body_is_refused(make: Make) -> None:
    resolver = make(allowed_mimes=("image/jpeg",))
    message = await refused(resolver, "http://img.example/octet")
    assert message == (f"`{WHERE}`: image type 'image/png' is not allowed "
                       f"(allowed: image/jpeg).")


async def test_the_first_failing_part_is_named(make: Make) -> None:
    sources = [source(data_uri(PNG), "messages[0].content[0]"),
               source("http://img.example/missing", "messages[0].content[1]"),
               source("data:bad", "messages[0].content[2]")]
    assert await refused(make(), sources) == (
        "`messages[0].content[1]`: image URL fetch failed (HTTP 404).")


async def test_aclose_is_idempotent(make: Make) -> None:
    resolver = make()
    await fetched(resolver, "http://img.example/cat.png")
    await resolver.aclose()
    await resolver.aclose()


# -- configuration (gateway.http.endpoints.chatCompletions.images) ------------------------


def test_images_config_loads_from_json5(tmp_path: Path) -> None:
    path = tmp_path / "clawbus.json5"
    path.write_text("""{
      gateway: { http: { endpoints: { chatCompletions: { images: {
        allowUrl: true,
        allowedMimes: ['Image/PNG', 'image/avif'],
        maxBytes: 1000, timeoutMs: 500, maxRedirects: 0,
        urlAllowlist: ['IMG.example.com.', '*.cdn.example', '203.0.113.9'],
      } } } } },
    }""", encoding="utf-8")
    images = load_settings(path, env={}).gateway.http.endpoints.chat_completions.images
    assert images == ImagesConfig(
        allow_url=True, allowed_mimes=("image/png", "image/avif"), max_bytes=1000,
        timeout_ms=500, max_redirects=0,
        url_allowlist=("img.example.com", "*.cdn.example", "203.0.113.9"))


def test_images_config_defaults() -> None:
    images = parse_settings({}, env={}).gateway.http.endpoints.chat_completions.images
    assert images == ImagesConfig()
    assert (images.allow_url, images.max_bytes, images.timeout_ms, images.max_redirects,
            images.url_allowlist) == (False, 10 * 1024 * 1024, 10_000, 3, ())
    assert images.allowed_mimes == ("image/jpeg", "image/png", "image/gif", "image/webp")


@pytest.mark.parametrize(("images", "problem"), [
    ({"allowUrl": "yes"}, "allowUrl: Input should be a valid boolean"),
    ({"maxBytes": 0}, "maxBytes: Input should be greater than or equal to 1"),
    ({"timeoutMs": 0}, "timeoutMs: Input should be greater than or equal to 1"),
    ({"maxRedirects": -1}, "maxRedirects: Input should be greater than or equal to 0"),
    ({"allowedMimes": ["png"]}, "'png' is not a MIME type"),
    ({"allowedMimes": "image/png"}, "allowedMimes: Input should be a valid tuple"),
    ({"allowedMimes": [1]}, "allowedMimes[0]: Input should be a valid string"),
    ({"urlAllowlist": ["http://img.example"]}, "'http://img.example' is not a host name"),
    ({"urlAllowlist": ["*"]}, "'*' is not a host name"),
    ({"urlAllowlist": ["*.*.example"]}, "'*.*.example' is not a host name"),
    ({"urlAllowlist": ["a..b"]}, "'a..b' is not a host name"),
    ({"urlAllowlist": ["*.::1"]}, "'*.::1' is not a host name"),
    ({"urlAllowlist": ["-a.example"]}, "'-a.example' is not a host name"),
    ({"urlAllowlist": ["bücher.example"]}, "punycode"),
    ({"allowURL": True}, "allowURL: unknown key"),
    ({"allow_url": True}, "allow_url: unknown key"),
])
def test_images_config_rejects_bad_values(images: dict[str, Any], problem: str) -> None:
    raw = {"gateway": {"http": {"endpoints": {"chatCompletions": {"images": images}}}}}
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, env={})
    assert "gateway.http.endpoints.chatCompletions.images." in str(info.value)
    assert problem in str(info.value)
