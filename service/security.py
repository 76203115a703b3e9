"""Optional API keys: ``Authorization: Bearer <key>``; the configuration holds only sha256 hashes of the keys.

The presented key is hashed and compared with every configured hash with ``hmac.compare_digest`` (no early exit), so
the time taken does not depend on which hash, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence


def hash_key(key: str) -> str:
    """The sha256 hex digest stored in UNIGUARD_API_KEY_HASHES for a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def key_matches(token: str | None, hashes: Sequence[str]) -> bool:
    """Constant-time check of a presented key against every configured hash."""
    digest = hash_key(token if token is not None else "").encode("ascii")
    matched = False
    for expected in hashes:
        matched |= hmac.compare_digest(digest, expected.encode("ascii"))
    return matched and token is not None
