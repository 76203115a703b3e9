"""Administration: POST /admin/reload-policies (also on SIGHUP). Needs the API key when keys are configured."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from policies.registry import PolicyError
from service.app import AppState
from service.errors import ServiceError
from service.routers.deps import get_state
from service.schemas import ErrorResponse, ReloadResult

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/reload-policies",
    response_model=ReloadResult,
    summary="Re-read the policy folders",
    responses={409: {"model": ErrorResponse, "description": "a policy file is invalid; the old registry serves on"}},
)
async def reload_policies(state: Annotated[AppState, Depends(get_state)]) -> ReloadResult:
    """Re-load the default policies and UNIGUARD_POLICY_DIRS. If any file is invalid, nothing changes: the error
    names the file and the previous registry keeps serving. Requests in flight finish with the registry they began
    with."""
    try:
        return await state.reload_policies()
    except PolicyError as exc:
        raise ServiceError(
            409, "invalid_policy_file", f"{exc}; the previous policies keep serving", field="policy_dirs"
        ) from None
