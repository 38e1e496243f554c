"""The proxy tunnel: a ``CONNECT`` request and the proxy's reply to it."""

from __future__ import annotations

from .errors import ConnectError

# Longest reply head from the proxy.
MAX_TUNNEL_HEAD = 64 * 1024


def connect_request(authority: str, authorization: str | None) -> bytes:
    """``CONNECT`` for ``authority`` (``host:port``), with the proxy's credentials."""
    target = authority.encode("idna")
    credentials = (b"proxy-authorization: %s\r\n" % authorization.encode("latin-1")
                   if authorization else b"")
    return b"CONNECT %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (target, target, credentials)


class TunnelReply:
    """The proxy's reply to ``CONNECT``, fed until its head ends: then :attr:`done`,
    or :attr:`error` if the proxy refused or did not speak HTTP."""

    __slots__ = ("_buffer", "done", "error")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.done = False
        self.error: ConnectError | None = None

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_TUNNEL_HEAD:
                self.error = ConnectError("the proxy's CONNECT reply is too long")
            return
        status_line = bytes(buffer[:buffer.find(b"\r\n")]).decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            self.error = ConnectError(
                f"not an HTTP reply from the proxy: {status_line[:100]!r}")
        elif not 200 <= int(parts[1]) < 300:
            self.error = ConnectError(f"the proxy refused the tunnel: {status_line[:200]}")
        elif end + 4 != len(buffer):  # the origin cannot have spoken yet: not a tunnel
            self.error = ConnectError("the proxy sent bytes after its CONNECT reply")
        else:
            self.done = True
