"""POST /classify."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import Response

from service.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError
from service.classifier import check_texts, effective_fail_mode, fail_open_response, resolve_policies
from service.errors import ServiceError
from service.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse
from service.state import StateDep

router = APIRouter(tags=["classify"])


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Judge texts under policies",
    responses={504: {"model": ErrorResponse, "description": "deadline exceeded; no verdict"}},
)
async def classify(request: ClassifyRequest, state: StateDep) -> Response:
    """Scores every (text, policy) pair: score = P(unsafe), verdict unsafe when score >= threshold.

    Threshold precedence: the request's `thresholds` > the model's calibrated threshold for that exact policy text >
    the policy file's explicit threshold (or the inline policy's) > the model's default threshold.
    Long texts are split into overlapping windows; the score is the maximum and `span` gives the best window.

    Fail mode: when the service cannot classify (not ready, model error, shutting down, deadline), a fail-closed
    server (the default) answers 503/504 and never a verdict; a fail-open server answers 200 with `degraded: true`,
    every verdict `safe` with `score: null` and `fail_open: true`. A full queue or a request that does not fit the
    admission budget is always 429 (413 when the request alone is too costly for the deadline).
    """
    started = time.monotonic()
    settings = state.settings
    mode = effective_fail_mode(request, settings)
    texts = request.texts
    check_texts(texts, settings)
    engine = state.engine
    registry, resolved = state.registry, state.resolved  # one consistent snapshot, even across a reload
    policies = resolve_policies(request, registry, engine.manifest if engine else None, settings, resolved)
    metrics = state.metrics
    try:
        classifier = state.guard.check()
        return _json(await classifier.classify(texts, policies, mode))
    except QueueFullError as exc:
        metrics.queue_rejected.inc()
        state.guard.admission.refused_for_capacity()
        raise ServiceError(
            429, "overloaded", f"{exc}; retry later", headers={"Retry-After": str(settings.retry_after_s)}
        ) from None
    except DeadlineExceededError:
        metrics.deadline_exceeded.inc()
        failure = ServiceError(
            504,
            "deadline_exceeded",
            f"no verdict within {settings.request_timeout_s}s (UNIGUARD_REQUEST_TIMEOUT_S); retry later",
        )
    except BatcherClosedError as exc:
        failure = ServiceError(503, "shutting_down", str(exc), headers={"Retry-After": "1"})
    except ServiceError as exc:
        if exc.status < 500:
            raise
        failure = exc
    except Exception as exc:
        failure = ServiceError(
            503, "inference_failed", f"the model could not score this request ({type(exc).__name__})"
        )
    if mode == "open":
        metrics.fail_open.labels(failure.code).inc()
        return _json(fail_open_response(texts, policies, engine.model_id if engine else None, failure.code, started))
    raise failure


def _json(body: ClassifyResponse) -> Response:
    """Serialise once with pydantic-core: the response is already a validated model, so FastAPI's response_model
    pass (dump to dict, validate again, encode) would only add latency to every verdict, cached ones included."""
    return Response(content=body.model_dump_json(), media_type="application/json")
