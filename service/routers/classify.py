"""POST /classify."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError
from service.classifier import Classifier
from service.errors import ServiceError
from service.routers.deps import get_classifier
from service.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse

router = APIRouter(tags=["classify"])


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Judge texts under policies",
    responses={
        400: {"model": ErrorResponse, "description": "invalid JSON"},
        413: {"model": ErrorResponse, "description": "body too large"},
        429: {"model": ErrorResponse, "description": "queue full; retry after Retry-After seconds"},
        504: {"model": ErrorResponse, "description": "deadline exceeded; no verdict"},
    },
)
async def classify(
    request: ClassifyRequest, classifier: Annotated[Classifier, Depends(get_classifier)]
) -> ClassifyResponse:
    """Scores every (text, policy) pair: score = P(unsafe), verdict unsafe when score >= threshold.

    Threshold precedence: the request's `thresholds` > the model's calibrated threshold for that exact policy text >
    the policy file's explicit threshold (or the inline policy's) > the model's default threshold.
    Long texts are split into overlapping windows; the score is the maximum and `span` gives the best window.
    """
    settings = classifier.settings
    try:
        return await classifier.classify(request)
    except QueueFullError as exc:
        classifier.metrics.queue_rejected.inc()
        raise ServiceError(
            429, "overloaded", f"{exc}; retry later", headers={"Retry-After": str(settings.retry_after_s)}
        ) from None
    except DeadlineExceededError:
        classifier.metrics.deadline_exceeded.inc()
        raise ServiceError(
            504,
            "deadline_exceeded",
            f"no verdict within {settings.request_timeout_s}s (UNIGUARD_REQUEST_TIMEOUT_S); retry later",
        ) from None
    except BatcherClosedError as exc:
        raise ServiceError(503, "shutting_down", str(exc), headers={"Retry-After": "1"}) from None
    except ServiceError:
        raise
    except Exception as exc:
        raise ServiceError(
            503, "inference_failed", f"the model could not score this request ({type(exc).__name__})"
        ) from None
