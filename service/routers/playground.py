"""The playground: one static page (HTML + JS + CSS, no build step) that calls the public API only.

``GET /`` serves the page, ``GET /playground/<file>`` its script, style sheet and icon. Both are left out of the
OpenAPI schema, need no API key (the page holds no data; its API calls send the key typed into it) and answer with
a Content-Security-Policy that allows exactly what the page uses: its own script, style sheet and icon, and requests
to this origin. ``UNIGUARD_PLAYGROUND=false`` leaves the router out (404).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import ServiceError
from service.state import StateDep

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=8)
def _read(name: str) -> bytes:
    return (PLAYGROUND_DIR / name).read_bytes()


@router.get("/")
async def page(state: StateDep) -> Response:
    auth = "required" if state.settings.api_key_hashes else "none"
    html = _read("index.html").decode("utf-8").replace("__AUTH__", auth)
    return Response(html, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ServiceError(404, "not_found", f"no playground file {name[:100]!r}", field="path")
    return Response(_read(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)
