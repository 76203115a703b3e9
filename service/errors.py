"""One JSON error envelope for every failure: ``{"error": {"code", "message", "field"}}``; never a stack trace."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("uniguard.service")


class ServiceError(Exception):
    """An error answered with the JSON envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


class BodyError(StarletteHTTPException):
    """Raised while the request body streams in (too large, not UTF-8): FastAPI re-raises HTTPExceptions."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, message)
        self.code = code


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: any string (even an unpaired surrogate echoed in a field path) renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, field=field))
    return AsciiJSONResponse(body.model_dump(), status_code=status, headers=headers)


def _loc_to_field(loc: Sequence[object]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        if first.get("type") == "json_invalid":
            return error_response(400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}")
        field = _loc_to_field(first.get("loc", ()))
        message = "; ".join(f"{_loc_to_field(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return error_response(422, "invalid_request", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            400: "invalid_body",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }
        code = exc.code if isinstance(exc, BodyError) else codes.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error on %s %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return error_response(500, "internal_error", "internal error; see the service logs")
