"""A clock the test moves, and one call through a circuit breaker."""

from __future__ import annotations

from router_service.breaker import CallOutcome, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def call_once(breaker: CircuitBreaker, outcome: CallOutcome, duration_s: float = 0.01) -> bool:
    permit = breaker.try_acquire()
    if permit is not None:
        breaker.record(permit, outcome, duration_s)
    return permit is not None
