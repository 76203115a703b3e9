"""GET /policies and GET /policies/{name}."""

from __future__ import annotations

from fastapi import APIRouter

from policies.registry import group_of
from policies.schema import Policy
from service.classifier import registry_threshold
from service.errors import ServiceError
from service.schemas import ErrorResponse, PolicyInfo, PolicyList
from service.state import AppState, StateDep

router = APIRouter(tags=["policies"])


def _info(policy: Policy, state: AppState) -> PolicyInfo:
    engine = state.engine
    if engine is not None:
        threshold = registry_threshold(policy, engine.manifest)
        known = any(r.name == policy.name and r.content_hash == policy.content_hash for r in engine.manifest.policies)
    else:
        threshold, known = policy.threshold, False
    return PolicyInfo(
        name=policy.name,
        version=policy.content_hash,
        description=policy.description,
        allowed=policy.allowed,
        disallowed=policy.disallowed,
        threshold=threshold,
        enabled_by_default=policy.enabled_by_default,
        known_to_model=known,
        group=group_of(policy),
        category_group=policy.category_group,
        response=policy.response,
    )


@router.get("/policies", response_model=PolicyList, summary="The registry's policies, and their groups")
async def list_policies(state: StateDep) -> PolicyList:
    """Every policy, in registry order, and the groups a request may name in `policies` (defaults, categories,
    custom)."""
    registry = state.registry
    return PolicyList(policies=[_info(p, state) for p in registry], groups=registry.groups)


@router.get(
    "/policies/{name}",
    response_model=PolicyInfo,
    summary="One policy",
    responses={404: {"model": ErrorResponse, "description": "no such policy"}},
)
async def get_policy(name: str, state: StateDep) -> PolicyInfo:
    if name not in state.registry:
        raise ServiceError(404, "unknown_policy", f"no policy named {name!r}; GET /policies lists them", field="name")
    return _info(state.registry[name], state)
