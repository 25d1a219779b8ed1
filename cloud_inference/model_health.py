"""Per-model health from Triton's answers: repeated INTERNAL takes a model out of service.

Triton keeps reporting a model READY after its python backend stub died (measured with
the bundled 2.x build: ``is_model_ready`` stays true while every request answers INTERNAL
"Stub process '<model>_0_0' is not healthy", for as long as the server runs). So readiness
alone cannot see it; the answers can. Pure logic with an injected clock:

- ``internal_threshold`` consecutive INTERNAL answers from a model make it unhealthy;
  any other answer (success, or a caller-side error such as INVALID_ARGUMENT or a
  deadline) ends the streak while the model is healthy;
- once unhealthy, only a probe (a tiny inference the service sends itself) makes it
  healthy again: answers to live calls do not, since a call admitted before the failure
  may still finish successfully after it;
- probes of one model are at least ``probe_interval_s`` apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelHealthConfig:
    internal_threshold: int = 3
    probe_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.internal_threshold < 1:
            raise ValueError("internal_threshold must be at least 1")
        if self.probe_interval_s <= 0:
            raise ValueError("probe_interval_s must be positive")


@dataclass
class _Model:
    consecutive_internal: int = 0
    healthy: bool = True
    last_probe_at: float | None = None


class ModelHealth:
    """Health of each model the service serves, from the outcomes it is told about."""

    def __init__(
        self,
        models: Iterable[str],
        config: ModelHealthConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or ModelHealthConfig()
        self._clock = clock
        self._models = {name: _Model() for name in models}

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def healthy(self, model: str) -> bool:
        state = self._models.get(model)
        return state is None or state.healthy

    @property
    def all_healthy(self) -> bool:
        return all(state.healthy for state in self._models.values())

    def unhealthy(self) -> list[str]:
        return [name for name, state in self._models.items() if not state.healthy]

    def record(self, model: str, internal: bool) -> bool:
        """One answer from ``model`` (``internal``: it was INTERNAL). True if this answer
        made the model unhealthy."""
        state = self._models.get(model)
        if state is None or not state.healthy:
            return False  # unknown models are Triton's NOT_FOUND; unhealthy: probes decide
        if not internal:
            state.consecutive_internal = 0
            return False
        state.consecutive_internal += 1
        if state.consecutive_internal < self.config.internal_threshold:
            return False
        state.healthy = False
        # The first probe may go out at once: the streak itself was the evidence.
        state.last_probe_at = None
        return True

    def due_probes(self) -> list[str]:
        """Unhealthy models whose next probe is due; each is marked as probed now."""
        now = self._clock()
        due = []
        for name, state in self._models.items():
            if state.healthy:
                continue
            if (
                state.last_probe_at is not None
                and now - state.last_probe_at < self.config.probe_interval_s
            ):
                continue
            state.last_probe_at = now
            due.append(name)
        return due

    def probe_result(self, model: str, ok: bool) -> bool:
        """A probe's outcome. True if it made the model healthy again."""
        state = self._models.get(model)
        if state is None or state.healthy or not ok:
            return False
        state.healthy = True
        state.consecutive_internal = 0
        return True
