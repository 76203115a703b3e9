"""Cost-aware admission: a request is admitted only if the engine can finish it, with everything already admitted,
within the request deadline; otherwise it is refused at once (429 + Retry-After, or 413 when it alone is too big).

Cost unit: model tokens (the sum of the lengths of the windows a request puts through the model). Before
tokenising, a request's cost is *estimated* from character counts (cheap, so a flood is refused in microseconds);
after tokenising, the exact cost replaces the estimate. The budget is ``engine speed (tokens/s) x request deadline x
UNIGUARD_ADMISSION_BUDGET_FRACTION``; the speed is measured at start-up on full batches and then follows the real
batches (or is fixed by UNIGUARD_ENGINE_TOKENS_PER_S).

Saturation (for /readyz): the service counts as saturated while admitted work fills the budget or a request was
refused for capacity within the last second; /readyz answers 503 once that has lasted UNIGUARD_READINESS_GRACE_S.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from service.config import Settings
from service.errors import ServiceError
from service.metrics import Metrics

CHARS_PER_TOKEN = 3.0  # conservative for English (about 4); the exact count replaces the estimate after tokenising
SPECIAL_TOKENS = 4
REFUSAL_MEMORY_S = 1.0
HIGH_WATER = 0.9
LEARN_RATE = 0.2


def estimate_tokens(policy_chars: int, text_chars: int, max_length: int) -> int:
    """Estimated model tokens of one (policy, text) pair, windows included (an upper-leaning guess)."""
    policy = min(math.ceil(policy_chars / CHARS_PER_TOKEN), max_length // 2) + SPECIAL_TOKENS
    text = math.ceil(text_chars / CHARS_PER_TOKEN)
    room = max(max_length - policy, 8)
    if text <= room:
        return policy + text
    step = max(room // 2, 1)  # windows overlap by at most half of their room
    windows = 1 + math.ceil((text - room) / step)
    return windows * max_length


@dataclass
class Ticket:
    """Work reserved for one request; released when the request ends."""

    cost: int
    released: bool = False


class Admission:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.tokens_per_s = float(settings.engine_tokens_per_s or 0.0)
        self.learn = False
        self.outstanding = 0
        self.last_refused = -math.inf
        self.saturated_since: float | None = None

    # -- speed ----------------------------------------------------------------------------------------------------
    def set_speed(self, tokens_per_s: float, learn: bool) -> None:
        self.tokens_per_s, self.learn = max(tokens_per_s, 1.0), learn
        self.metrics.admission_budget.set(self.budget)

    def observe_batch(self, windows: int, tokens: int, seconds: float) -> None:
        """Follow the engine's real speed, batch by batch: under load (other processes on the cores, tokenising
        threads) it can be well below the start-up measurement, and the budget must shrink with it."""
        if not self.learn or tokens <= 0 or seconds <= 0:
            return
        self.tokens_per_s += LEARN_RATE * (tokens / seconds - self.tokens_per_s)
        self.metrics.admission_budget.set(self.budget)

    @property
    def budget(self) -> float:
        """Tokens the engine can finish within one request deadline (times the configured fraction)."""
        s = self.settings
        return self.tokens_per_s * s.request_timeout_s * s.admission_budget_fraction

    # -- admission ------------------------------------------------------------------------------------------------
    def admit(self, cost: int) -> Ticket:
        """Reserve ``cost`` tokens or refuse: 413 when the request alone exceeds the budget, 429 when it does not
        fit beside the work already admitted."""
        self._check(cost, self.outstanding)
        return self._reserve(cost)

    def resize(self, ticket: Ticket, cost: int) -> None:
        """Replace an estimate by the exact cost; refuse (413/429) if a larger exact cost no longer fits. The caller
        releases the ticket either way when the request ends."""
        if cost > ticket.cost and not ticket.released:
            self._check(cost, self.outstanding - ticket.cost)
        if not ticket.released:
            self.outstanding += cost - ticket.cost
            self.metrics.admitted_tokens.set(self.outstanding)
        ticket.cost = cost

    def _check(self, cost: int, others: int) -> None:
        budget = self.budget
        if budget <= 0:  # speed not measured yet (the readiness check refuses before this)
            return
        if cost > budget:
            self._refused("too_costly")
            raise ServiceError(
                413,
                "request_too_costly",
                f"this request needs about {cost} model tokens; the service finishes at most {budget:.0f} within "
                f"its {self.settings.request_timeout_s:g} s deadline: send fewer or shorter texts, or fewer policies",
                field="input",
            )
        if others and others + cost > budget:
            self._refused("overloaded")
            retry = max(self.settings.retry_after_s, math.ceil((others + cost - budget) / self.tokens_per_s), 1)
            raise ServiceError(
                429,
                "overloaded",
                f"the service is busy ({others} model tokens admitted, budget {budget:.0f}); retry after {retry} s",
                headers={"Retry-After": str(retry)},
            )

    def release(self, ticket: Ticket) -> None:
        if not ticket.released:
            ticket.released = True
            self.outstanding -= ticket.cost
            self._update(time.monotonic())
            self.metrics.admitted_tokens.set(self.outstanding)

    def _reserve(self, cost: int) -> Ticket:
        self.outstanding += cost
        self.metrics.admitted_tokens.set(self.outstanding)
        self._update(time.monotonic())
        return Ticket(cost)

    def _refused(self, reason: str) -> None:
        self.metrics.admission_rejected.labels(reason).inc()
        if reason == "overloaded":  # a request too costly on its own says nothing about the load
            self.refused_for_capacity()

    # -- saturation -----------------------------------------------------------------------------------------------
    def refused_for_capacity(self) -> None:
        """A request was turned away for lack of capacity (admission or the in-flight limit)."""
        now = time.monotonic()
        self.last_refused = now
        self._update(now)

    def _update(self, now: float) -> None:
        budget = self.budget
        full = budget > 0 and self.outstanding >= HIGH_WATER * budget
        saturated = full or now - self.last_refused < REFUSAL_MEMORY_S
        if not saturated:
            self.saturated_since = None
        elif self.saturated_since is None:
            self.saturated_since = now

    def saturated_for(self) -> float:
        """Seconds the service has been saturated without a break (0 when it is not)."""
        now = time.monotonic()
        self._update(now)
        return 0.0 if self.saturated_since is None else now - self.saturated_since
