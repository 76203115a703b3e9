"""Structured logs: one JSON object per line (ts, level, logger, msg, request_id, and any extra fields).

Prompts are never logged, at any level: log calls in the service pass counts, codes and hashes only. The access log
line of a request carries method, path, status and latency_ms; ``X-Request-ID`` ties it to the client's request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("uniguard_request_id", default=None)
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Fields a log call may add with ``extra={...}``; anything else is dropped (a typo must not leak a payload).
EXTRA_FIELDS = ("method", "path", "status", "latency_ms", "code", "client", "policies", "error")
_STANDARD = set(vars(logging.makeLogRecord({})))


def new_request_id(candidate: str | None) -> str:
    """The client's X-Request-ID if it is a short token, else a fresh one (never echo arbitrary header text)."""
    if candidate and REQUEST_ID_PATTERN.match(candidate):
        return candidate
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for name in EXTRA_FIELDS:
            if name in record.__dict__ and name not in _STANDARD:
                entry[name] = record.__dict__[name]
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: messages and tracebacks may quote request data.
            entry["exc_type"] = record.exc_info[0].__name__
            frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info[2] else []
            if frames:
                entry["exc_where"] = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}"
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the root logger and uvicorn's loggers (no uvicorn access log: we write our own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
