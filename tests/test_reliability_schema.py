"""Schemathesis against the service's own OpenAPI schema (the real app over ASGI, with its lifespan and the tiny
model): no 5xx, and every response (errors included) conforms to the schema. Bounded: at most 100 valid and 60
invalid generated requests per operation, 8 operations."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis

# Loaded at collection, while only the main thread runs. Left to from_asgi, this import (and pytest's rewrite of it)
# ran beside the app's threads, and CPython 3.11's ast.parse failed once with "AST constructor recursion depth
# mismatch" (cpython gh-106905).
import schemathesis.specs.openapi.schemas
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.engine import OnnxEngine
from tests.service_support import make_settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir: Path, tiny_engine: OnnxEngine) -> Iterator[Any]:
    app = create_app(make_settings(tiny_model_dir, max_text_chars=2000), lambda s: tiny_engine)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    client = schemathesis.python.asgi.get_client(app)
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.05)
    yield schema
    schemathesis.python.asgi.shutdown_lifespans()  # drains the batcher and closes the cache


EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 60}


def test_api_conforms_to_its_schema(api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert "POST /classify" in labels and "POST /admin/reload-policies" in labels and len(labels) == 8, labels
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        takes_body = bool(operation.get_request_payload_content_types())
        for mode, examples in EXAMPLES.items():
            if mode is GenerationMode.NEGATIVE and not takes_body:
                continue  # invalid requests: bodies only (a URL path segment is always some string)

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call_and_validate(checks=CHECKS)
                statuses.setdefault(case.operation.label, set()).add(response.status_code)

            run()
    # the run reached the model, and the validation errors, of /classify
    assert {200, 422} <= statuses["POST /classify"], statuses
