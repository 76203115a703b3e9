"""Administration: POST /admin/reload-policies (also on SIGHUP). Off unless UNIGUARD_ADMIN_KEY_HASHES is set (then
only those keys may call it) or UNIGUARD_ADMIN_ENABLED=true (then the API key rule applies): service/middleware.py."""

from __future__ import annotations

from fastapi import APIRouter

from policies.registry import PolicyError
from service.errors import ServiceError
from service.schemas import ErrorResponse, ReloadResult
from service.state import StateDep

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/reload-policies",
    response_model=ReloadResult,
    summary="Re-read the policy folders",
    responses={
        404: {"model": ErrorResponse, "description": "admin endpoints disabled (no admin key, not enabled)"},
        409: {"model": ErrorResponse, "description": "a policy file is invalid; the old registry serves on"},
    },
)
async def reload_policies(state: StateDep) -> ReloadResult:
    """Re-load the default policies and UNIGUARD_POLICY_DIRS. If any file is invalid, nothing changes: the error
    names the file and the previous registry keeps serving. Requests in flight finish with the registry they began
    with."""
    try:
        return await state.reload_policies()
    except PolicyError as exc:
        raise ServiceError(
            409, "invalid_policy_file", f"{exc}; the previous policies keep serving", field="policy_dirs"
        ) from None
