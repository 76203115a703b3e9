"""One JSON error envelope for every failure: ``{"error": {"code", "message", "field"}}``; never a stack trace."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
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
    """Raised while the request body streams in (too large, not UTF-8, too slow, no in-flight slot): FastAPI
    re-raises HTTPExceptions, and the handler below renders the envelope."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers=headers)
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


REQUEST_FIELDS = ("input", "policies", "custom_policies", "thresholds", "fail_mode")
# Plain words for a wrong value in each request field (pydantic's own messages name its internals).
FIELD_RULES = {
    "input": "input must be a string or a list of strings",
    "policies": "policies must be a list of policy names (strings)",
    "thresholds": "thresholds must map policy names to numbers between 0 and 1 (not strings or booleans)",
    "fail_mode": 'fail_mode must be "closed" or "open"',
    "custom_policies": "custom_policies must be a list of objects with name, description, disallowed and optionally "
    "allowed and threshold",
}
INLINE_RULES = {
    "name": "must be a snake_case name: a lower-case letter, then lower-case letters, digits or underscores",
    "description": "must be a string of 10 to 2000 characters",
    "allowed": "must be a list of at most 30 strings",
    "disallowed": "must be a list of 1 to 30 strings",
    "threshold": "must be a number between 0 and 1 (not a string or boolean), or null",
}
UNION_TAGS = frozenset({"str", "list[str]"})


def _loc_to_field(loc: Sequence[object]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    if parts[:1] == ["input"]:  # drop the union branch names pydantic puts in the location
        parts = ["input", *[p for p in parts[1:] if p not in UNION_TAGS]]
    return ".".join(parts) or None


def _clean(message: str) -> str:
    while message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return message.replace("Input should be", "should be")


def plain_error(error: Mapping[str, Any]) -> tuple[str | None, str]:
    """The field and a plain-words message for one pydantic error of a request body."""
    loc = [p for p in error.get("loc", ()) if p != "body"]
    field = _loc_to_field(loc)
    kind = str(error.get("type", ""))
    top = str(loc[0]) if loc else ""
    if kind == "missing":
        return field, f"{field} is required"
    if kind == "extra_forbidden":
        if len(loc) == 1:
            return field, f"{field} is not a request field; the fields are {', '.join(REQUEST_FIELDS)}"
        return field, f"{field} is not a field of an inline policy; the fields are {', '.join(INLINE_RULES)}"
    if not loc:
        return None, 'the body must be a JSON object such as {"input": "text to check"}'
    if top == "custom_policies" and len(loc) >= 3 and str(loc[2]) in INLINE_RULES:
        rule = INLINE_RULES[str(loc[2])]
        if kind.endswith("_type") or kind.startswith(("string_", "too_", "float_", "greater", "less", "list_")):
            return field, f"custom_policies.{loc[1]}.{loc[2]} {rule}"
    if top == "custom_policies" and len(loc) >= 2 and kind == "value_error":
        return field, f"custom_policies.{loc[1]}: {_clean(str(error.get('msg', '')))}"
    if top in FIELD_RULES and (len(loc) == 1 or kind.endswith("_type") or top in ("input", "thresholds")):
        if top == "input" and kind == "value_error":
            return field, _clean(str(error.get("msg", "")))
        return field, FIELD_RULES[top]
    return field, f"{field}: {_clean(str(error.get('msg', '')))}"


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
        # of a union's errors (input: a string, or a list of strings) the deepest names the offending item
        top = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
        first = max(top or [first], key=lambda e: len(e.get("loc", ())))
        field, message = plain_error(first)
        others = list(dict.fromkeys(plain_error(e)[1] for e in errors[1:5]))
        extra = [m for m in others if m != message]
        return error_response(422, "invalid_request", "; ".join([message, *extra]), field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            400: "invalid_json",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }
        code = exc.code if isinstance(exc, BodyError) else codes.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if code == "invalid_json" and not isinstance(exc, BodyError):  # the JSON parser gave up (e.g. nesting)
            message = "request body could not be parsed as JSON (not JSON, or nested too deeply)"
        return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}))

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
