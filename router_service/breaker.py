"""Circuit breaker per downstream target: pure logic with an injectable clock.

Semantics follow resilience4j's time-based breaker (window, minimum calls, failure and
slow-call rate thresholds, half-open probes) with these additions:

- the open period starts at ``open_base_s`` and doubles on each consecutive re-open
  (up to ``open_max_s``), so a target that keeps failing is probed less and less;
- ``consecutive_failures_to_open`` trips the breaker on a run of failures even while
  the window still holds older successes. With a 10 s window at a steady rate the
  rate rule alone needs ~5 s of total failure to reach 50 %; a dead cloud should be
  cut off within about a second (Envoy's consecutive_5xx outlier detection does the same);
- epochs: every state transition starts a new epoch, and a call's outcome counts only
  in the epoch that admitted it (its ``Permit``). A call started while CLOSED that
  returns after the breaker opened and half-opened says nothing about the half-open
  target: it neither closes nor re-opens the breaker, frees no probe slot and does not
  enter a later window. Only probes admitted in HALF_OPEN decide a half-open breaker;
- background work (outbox replays) is refused while HALF_OPEN, so it never takes the
  probe slots live traffic needs to find out whether the target is back.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import overload

import grpc


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CallOutcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    # Caller errors (bad input, caller cancelled) say nothing about the target's health.
    IGNORED = "ignored"


FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def outcome_of(code: grpc.StatusCode) -> CallOutcome:
    if code == grpc.StatusCode.OK:
        return CallOutcome.SUCCESS
    if code in FAILURE_CODES:
        return CallOutcome.FAILURE
    return CallOutcome.IGNORED


@dataclass(frozen=True)
class BreakerConfig:
    """Thresholds of one breaker; invalid values raise ValueError at construction."""

    window_s: float = 10.0
    minimum_calls: int = 20
    failure_rate_to_open: float = 0.5
    slow_call_rate_to_open: float = 0.8
    # A call slower than this counts as slow (the target's latency SLO).
    slow_call_s: float = 0.5
    open_base_s: float = 5.0
    open_max_s: float = 60.0
    half_open_probes: int = 3
    consecutive_failures_to_open: int = 5

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be > 0, got {value}"
            for name, value in (
                ("window_s", self.window_s),
                ("slow_call_s", self.slow_call_s),
                ("open_base_s", self.open_base_s),
                ("open_max_s", self.open_max_s),
            )
            if not value > 0
        ]
        problems += [
            f"{name} must be in (0, 1], got {value}"
            for name, value in (
                ("failure_rate_to_open", self.failure_rate_to_open),
                ("slow_call_rate_to_open", self.slow_call_rate_to_open),
            )
            if not 0 < value <= 1
        ]
        problems += [
            f"{name} must be >= 1, got {value}"
            for name, value in (
                ("minimum_calls", self.minimum_calls),
                ("half_open_probes", self.half_open_probes),
                ("consecutive_failures_to_open", self.consecutive_failures_to_open),
            )
            if value < 1
        ]
        if self.open_max_s < self.open_base_s:
            problems.append(
                f"open_max_s ({self.open_max_s}) must be >= open_base_s ({self.open_base_s})"
            )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Permit:
    """Leave to make one call, from ``CircuitBreaker.try_acquire``; hand it back with the
    call's outcome to ``CircuitBreaker.record`` exactly once."""

    epoch: int
    probe: bool  # admitted in HALF_OPEN


@dataclass(frozen=True)
class _Call:
    at: float
    failed: bool
    slow: bool


StateListener = Callable[[str, BreakerState, BreakerState], None]


class CircuitBreaker:
    """Decides whether a call to one target may go ahead, from the outcomes of past calls.

    Use: ``permit = breaker.try_acquire()``; if not None, make the call, then
    ``breaker.record(permit, outcome, duration_s)`` exactly once (IGNORED included, so
    a half-open probe slot is returned). Outcomes whose permit comes from an earlier
    epoch (state) are ignored.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._on_state_change = on_state_change
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self._calls: deque[_Call] = deque()
        self._failures = 0
        self._slow = 0
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._consecutive_opens = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        # Permits handed out by the deprecated allow_request(), oldest first.
        self._unclaimed: deque[Permit] = deque()

    @property
    def state(self) -> BreakerState:
        self._end_open_period_if_due()
        return self._state

    @property
    def epoch(self) -> int:
        """Starts at 0; every state transition adds one."""
        self._end_open_period_if_due()
        return self._epoch

    @property
    def probes_in_flight(self) -> int:
        """Half-open probes admitted in this epoch and not yet recorded."""
        return self._probes_in_flight if self.state is BreakerState.HALF_OPEN else 0

    @property
    def open_for_s(self) -> float:
        """How long the current (or next) open period lasts."""
        exponent = max(self._consecutive_opens - 1, 0)
        return min(self.config.open_base_s * 2.0**exponent, self.config.open_max_s)

    def remaining_open_s(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(self._opened_at + self.open_for_s - self._clock(), 0.0)

    def try_acquire(self, *, background: bool = False) -> Permit | None:
        """A permit for one call, or None when the breaker refuses it: OPEN; HALF_OPEN
        with all probe slots taken; or HALF_OPEN and ``background`` (work nobody waits
        for must not use up the probes that decide whether live traffic may go)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self._epoch, probe=False)
        if (
            state is BreakerState.HALF_OPEN
            and not background
            and self._probes_in_flight < self.config.half_open_probes
        ):
            self._probes_in_flight += 1
            return Permit(self._epoch, probe=True)
        return None

    def health_lost(self) -> None:
        """The target's own health check says it cannot serve (NOT_SERVING or no answer,
        twice in a row): the breaker opens now, before live calls pay for finding out,
        as Envoy's active health checking ejects a host. ``health_restored`` half-opens
        it again; the probes decide."""
        if self._state is not BreakerState.OPEN:
            self._open(self._clock())

    def health_restored(self) -> None:
        """The target's own health check turned SERVING again: an open breaker moves to
        half-open now instead of waiting out its (possibly doubled) open period, as
        Envoy's active health checking returns an ejected host. The probes still decide:
        a failed probe re-opens it with the next, longer period."""
        if self._state is BreakerState.OPEN:
            self._transition(BreakerState.HALF_OPEN)

    def allow_request(self) -> bool:
        """Deprecated: ``try_acquire`` for callers that cannot carry a permit. The permit
        is kept in admission order and ``record(outcome, duration_s)`` without one
        settles the oldest outstanding permit (calls assumed to finish in the order
        they started), so even these callers' late outcomes count only in their epoch."""
        permit = self.try_acquire()
        if permit is not None:
            self._unclaimed.append(permit)
        return permit is not None

    @overload
    def record(self, permit: Permit, outcome: CallOutcome, duration_s: float = 0.0) -> None: ...

    @overload
    def record(self, permit: CallOutcome, outcome: float = 0.0) -> None: ...

    def record(
        self,
        permit: Permit | CallOutcome,
        outcome: CallOutcome | float = 0.0,
        duration_s: float = 0.0,
    ) -> None:
        """Record the outcome of a call made with ``permit``. A permit from an earlier
        epoch (the breaker changed state since the call was admitted) is ignored.
        ``record(outcome, duration_s)``: the deprecated form, after ``allow_request``."""
        if isinstance(permit, CallOutcome):
            if not self._unclaimed:
                return  # nothing was admitted through allow_request
            assert not isinstance(outcome, CallOutcome)
            self._record(self._unclaimed.popleft(), permit, outcome)
            return
        assert isinstance(outcome, CallOutcome)
        self._record(permit, outcome, duration_s)

    def _record(self, permit: Permit, outcome: CallOutcome, duration_s: float) -> None:
        if permit.epoch != self.epoch:
            return  # a straggler: admitted in a state that no longer holds
        if permit.probe:
            self._record_probe(outcome, duration_s)
            return
        if outcome is CallOutcome.IGNORED:
            return  # a caller error says nothing about the target
        now = self._clock()
        call = _Call(
            at=now,
            failed=outcome is CallOutcome.FAILURE,
            slow=duration_s > self.config.slow_call_s,
        )
        self._calls.append(call)
        self._failures += call.failed
        self._slow += call.slow
        self._consecutive_failures = self._consecutive_failures + 1 if call.failed else 0
        self._evict(now)
        if self._should_open():
            self._open(now)

    def _record_probe(self, outcome: CallOutcome, duration_s: float) -> None:
        self._probes_in_flight = max(self._probes_in_flight - 1, 0)
        if outcome is CallOutcome.IGNORED:
            return
        if outcome is CallOutcome.FAILURE or duration_s > self.config.slow_call_s:
            self._open(self._clock())
            return
        self._probe_successes += 1
        if self._probe_successes >= self.config.half_open_probes:
            self._consecutive_opens = 0
            self._transition(BreakerState.CLOSED)

    def _end_open_period_if_due(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self.open_for_s:
            self._transition(BreakerState.HALF_OPEN)

    def _should_open(self) -> bool:
        if self._consecutive_failures >= self.config.consecutive_failures_to_open:
            return True
        total = len(self._calls)
        if total < self.config.minimum_calls:
            return False
        return (
            self._failures / total >= self.config.failure_rate_to_open
            or self._slow / total >= self.config.slow_call_rate_to_open
        )

    def _evict(self, now: float) -> None:
        horizon = now - self.config.window_s
        while self._calls and self._calls[0].at < horizon:
            old = self._calls.popleft()
            self._failures -= old.failed
            self._slow -= old.slow

    def _open(self, now: float) -> None:
        self._consecutive_opens += 1
        self._opened_at = now
        self._transition(BreakerState.OPEN)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        # A new epoch: permits handed out before this point no longer count, and the
        # state starts with a clean slate (no stale window, no stale probes).
        self._epoch += 1
        self._calls.clear()
        self._failures = self._slow = self._consecutive_failures = 0
        self._probes_in_flight = self._probe_successes = 0
        if self._on_state_change is not None and old is not new:
            self._on_state_change(self.name, old, new)
