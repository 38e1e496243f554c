"""The web chat page (``gateway.controlUi``): ``GET /`` and ``/static/…``.

Plain files shipped inside the package (``gateway/static``; no build step): the
page talks to the gateway's own WebSocket protocol at ``/`` and to
``/v1/models``. Every response of the page carries a strict Content-Security-
Policy: scripts, styles and connections from this origin only, nothing inline,
no framing. Disabled (``controlUi.enabled: false``), nothing is routed and
``GET /`` answers 404, while the WebSocket on ``/`` keeps working.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = STATIC_DIR / "index.html"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
UI_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}


class _UiFiles(StaticFiles):
    """Static files with the page's headers (a stray .html here gets the CSP too)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(UI_HEADERS)
        return response


def mount_web_ui(app: FastAPI) -> None:
    """Route ``GET /`` and ``/static`` (call only when the page is enabled)."""

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers=UI_HEADERS)

    app.mount("/static", _UiFiles(directory=STATIC_DIR), name="static")
