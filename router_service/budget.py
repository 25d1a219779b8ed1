"""How much of a request's time budget one tier attempt may use. Pure.

A request's deadline bounds all its work, and no single tier attempt may use the time
its fallback needs (Envoy's per-try timeout, gRFC A6's idea of a retry budget):

- an attempt is capped from the tier's own latency history: ``p99_multiple`` times its
  rolling p99, never below ``floor_s``; ``default_cap_s`` until the tier has a history
  (a hung tier costs the cap, not the deadline);
- when another tier could take over, its expected latency (its rolling p95, or
  ``default_reserve_s`` until it has history) plus ``reserve_margin_s`` is held back;
- when the reserve does not fit, the attempt gets what is left: a fallback that cannot
  finish in time is worth less than the attempt itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttemptBudget:
    """Settings for attempt timeouts, all in seconds (see the module docstring)."""

    floor_s: float = 0.1
    p99_multiple: float = 4.0
    default_cap_s: float = 0.25
    default_reserve_s: float = 0.25
    reserve_margin_s: float = 0.01

    def timeout(
        self,
        remaining_s: float,
        own_p99_s: float | None,
        fallback_p95_s: float | None,
        *,
        fallback_possible: bool,
    ) -> float:
        """Seconds the attempt may take; at most ``remaining_s``.

        ``own_p99_s``: the tier's rolling p99 (None: no history yet, ``default_cap_s``).
        ``fallback_p95_s``: the other tier's rolling p95 (None: use the default reserve).
        """
        cap = (
            self.default_cap_s
            if own_p99_s is None
            else max(self.floor_s, self.p99_multiple * own_p99_s)
        )
        limit = min(remaining_s, cap)
        if fallback_possible:
            limit = min(limit, self.leaving_reserve(remaining_s, fallback_p95_s))
        return max(limit, 0.0)

    def leaving_reserve(self, remaining_s: float, fallback_p95_s: float | None) -> float:
        """``remaining_s`` less the fallback's reserve, when that leaves at least
        ``floor_s``; else all of ``remaining_s``."""
        reserve = (
            fallback_p95_s if fallback_p95_s is not None else self.default_reserve_s
        ) + self.reserve_margin_s
        return remaining_s - reserve if remaining_s - reserve >= self.floor_s else remaining_s
