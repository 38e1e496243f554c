"""Image parts of a chat request → validated images for the model (SPEC §8).

:func:`image_source` reads one ``image_url`` / ``input_image`` part;
:class:`ImageResolver` turns a request's sources, in order, into
:class:`~bus.messages.ImagePart` values: data URIs are decoded and checked here,
``http(s)`` URLs fetched by :mod:`gateway.image_fetch` (when ``allowUrl`` is on).
Every failure is a 400 ``invalid_request_error`` whose message starts with the
part's place in the request, e.g. ``\\`messages[1].content[0]\\`: image URL fetching
is disabled.``
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bus.messages import ImagePart
from clawbus.config import MIME_TYPE, ImagesConfig
from gateway.errors import ApiError, invalid_request
from gateway.image_fetch import (
    FetchError,
    ImageFetcher,
    ImageTooLarge,
    Lookup,
    Route,
    mime_not_allowed,
)

MAX_IMAGES = 8
MAX_TOTAL_BYTES = 20 * 1024 * 1024

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


@dataclass(frozen=True, slots=True)
class ImageSource:
    """One image part of a request, not yet checked."""

    where: str  # the part's place, for errors: "messages[2].content[1]"
    url: str  # a data URI or an http(s) URL
    detail: str | None  # image_url.detail, passed through to the model


def _part_error(where: str, reason: str) -> ApiError:
    return invalid_request(f"`{where}`: {reason}.")


def image_source(part: dict[str, Any], where: str) -> ImageSource:
    """The source of an ``{"type": "image_url", "image_url": {"url", "detail"?}}`` part,
    or of its alias ``{"type": "input_image", "image_url": url | {"url"}, "detail"?}``.
    Raises a 400 :class:`ApiError` naming ``where`` when the URL is missing or not a
    string, or ``detail`` is not a string."""
    image = part.get("image_url")
    inner = image if isinstance(image, dict) else {"url": image}
    url = inner.get("url")
    if not isinstance(url, str) or not url.strip():
        raise _part_error(where, "image_url.url must be a data URI or an http(s) URL")
    detail = inner.get("detail", part.get("detail"))
    if detail is not None and not isinstance(detail, str):
        raise _part_error(where, "image_url.detail must be a string")
    return ImageSource(where, url.strip(), detail)


class ImageResolver:
    """Checks and loads a request's images. One per gateway: it owns the HTTP
    session that URL fetches share; :meth:`aclose` closes it.

    ``lookup`` (host → addresses; default: the system resolver), ``route``
    (vetted address → the host and port actually dialled) and ``tls`` (the context
    for https; default: the system's trust store) are test hooks: the address
    guard judges what ``lookup`` returned, before ``route``."""

    def __init__(self, config: ImagesConfig, *, lookup: Lookup | None = None,
                 route: Route | None = None, tls: ssl.SSLContext | None = None) -> None:
        self._config = config
        self._fetcher = ImageFetcher(config, lookup=lookup, route=route, tls=tls)

    async def resolve(self, sources: Sequence[ImageSource]) -> tuple[ImagePart, ...]:
        """The images of ``sources``, in order. Raises a 400 :class:`ApiError` at the
        first part that fails, naming it and the reason."""
        if len(sources) > MAX_IMAGES:
            raise _part_error(sources[MAX_IMAGES].where,
                              f"too many images (at most {MAX_IMAGES} a request)")
        parts: list[ImagePart] = []
        total = 0
        for source in sources:
            try:
                part = await self._one(source, MAX_TOTAL_BYTES - total)
            except FetchError as exc:
                raise _part_error(source.where, str(exc)) from None
            total += part.size
            parts.append(part)
        return tuple(parts)

    async def aclose(self) -> None:
        """Close the fetch session (idempotent)."""
        await self._fetcher.aclose()

    async def _one(self, source: ImageSource, room: int) -> ImagePart:
        """One image, of at most ``room`` bytes (what is left of the request's total)."""
        scheme, colon, _ = source.url.partition(":")
        scheme = scheme.lower()
        if not colon or not _SCHEME.fullmatch(scheme):
            raise FetchError("bad image URL (a data URI or an http(s) URL)")
        if scheme == "data":
            mime, data, size = self._data_uri(source.url)
            if size > room:
                raise _too_large_in_all()
            return ImagePart(mime=mime, data=data, size=size, detail=source.detail)
        if scheme not in ("http", "https"):
            raise FetchError(f"unsupported image URL scheme '{scheme}'")
        if not self._config.allow_url:
            raise FetchError("image URL fetching is disabled")
        limit = min(self._config.max_bytes, room)
        try:
            fetched = await self._fetcher.fetch(source.url, limit)
        except ImageTooLarge:
            if limit < self._config.max_bytes:
                raise _too_large_in_all() from None
            raise
        return ImagePart(mime=fetched.mime, data=base64.b64encode(fetched.data).decode("ascii"),
                         size=len(fetched.data), detail=source.detail)

    def _data_uri(self, url: str) -> tuple[str, str, int]:
        """(MIME type, base64 without whitespace, decoded size) of a ``data:`` URI."""
        header, comma, payload = url[len("data:"):].partition(",")
        params = [p.strip().lower() for p in header.split(";")]
        mime = params[0]
        if not comma or not MIME_TYPE.fullmatch(mime):
            raise FetchError("bad data URI (expected data:<mime>;base64,<data>)")
        if params[-1] != "base64":
            raise FetchError("bad data URI (not base64-encoded)")
        if mime not in self._config.allowed_mimes:
            raise mime_not_allowed(mime, self._config.allowed_mimes)
        data = "".join(payload.split())
        if len(data) % 4:  # padding left off: accepted, and put back
            data += "=" * (-len(data) % 4)
        try:
            size = len(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise FetchError("bad data URI (invalid base64)") from None
        if not size:
            raise FetchError("bad data URI (no data)")
        return mime, data, size


def _too_large_in_all() -> FetchError:
    return FetchError(f"images are larger than {MAX_TOTAL_BYTES} bytes in all")
