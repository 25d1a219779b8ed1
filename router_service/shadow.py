"""Shadow checks: a small random sample of the answers the router kept on the edge is also
sent to the cloud, in the background, to estimate the edge's error among kept answers.

- Privacy: PUBLIC items only; INTERNAL only when the operator turned that on and the
  pair has an anonymiser, which ``CloudTier`` applies before upload; SENSITIVE never
  (``shadow_eligible``, and ``CloudTier`` refuses SENSITIVE whatever the caller).
- Never on the caller's path: the request schedules a task and answers; the answer and
  its timing do not depend on the check. At most ``max_in_flight`` checks run at once;
  one more is dropped, not queued. Behind the cloud breaker as background work (refused
  while it is open or half-open, and while the health check says the cloud is down):
  dropped, never queued for later.
- Marked as shadow everywhere: the audit record's purpose is ``shadow``, the cost counter
  carries ``shadow=true``, the ``router.shadow_check`` span is a child of the request's
  ``router.decide`` span (one trace) and links to it, and the labels are recorded in the
  outbox's ``reconciled`` table with ``source = "shadow"`` (what ``training.retrain``
  reads) under the request id plus ``:shadow``.
- Each check (cloud class vs edge class, per item) feeds the pair's
  ``EdgeErrorEstimator`` with the item's escalation score.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from opentelemetry import metrics, trace

from hybridmesh.common.v1 import routing_pb2
from router_service.breaker import BreakerState
from router_service.edge_error_estimate import EdgeErrorEstimator
from router_service.outbox import ReconciledItem
from router_service.request_validation import PairSpec
from router_service.tier_api import CloudTierApi, TierUnavailableError
from services import attributes
from services.logging import get_logger
from services.request_ids import REQUEST_ID_MAX_CHARS
from services.tensors import encode_tensor

PURPOSE = "shadow"
SOURCE = "shadow"
SUFFIX = ":shadow"

_log = get_logger("router_service.shadow")

LabelSink = Callable[[Sequence[ReconciledItem]], Awaitable[None]]
# Bills a shadow check: (micro-units of the currency, pair).
Billing = Callable[[int, str], None]


def shadow_eligible(
    privacy_class: routing_pb2.PrivacyClass.ValueType, anonymiser: str, *, internal: bool
) -> bool:
    """May a kept answer of this privacy class be shadow-checked? ``anonymiser``: the
    pair's; ``internal``: the operator allows INTERNAL checks (through it)."""
    if privacy_class == routing_pb2.PRIVACY_CLASS_PUBLIC:
        return True
    return privacy_class == routing_pb2.PRIVACY_CLASS_INTERNAL and internal and bool(anonymiser)


def shadow_request_id(request_id: str) -> str:
    """Its own id: the shadow labels never collide with the request's reconciliation."""
    return request_id[: REQUEST_ID_MAX_CHARS - len(SUFFIX)] + SUFFIX


@dataclass(frozen=True)
class ShadowSettings:
    rate: float
    max_in_flight: int
    timeout_s: float
    internal: bool = False
    cloud_price_micros: int = 0


@dataclass(frozen=True)
class KeptAnswers:
    """What a request kept on the edge, for one possible check."""

    request_id: str
    pair: PairSpec
    privacy_class: routing_pb2.PrivacyClass.ValueType
    inputs: npt.NDArray[np.generic]
    # Indices (in the caller's batch) of the kept items, their edge top-1 classes and
    # escalation scores.
    indices: tuple[int, ...]
    edge_classes: tuple[int, ...]
    scores: tuple[float, ...]
    edge_model: str


class ShadowMetrics:
    def __init__(self, meter: metrics.Meter) -> None:
        self.sent = meter.create_counter(
            "hybridmesh.router.shadow.items", description="Kept answers shadow-checked"
        )
        self.dropped = meter.create_counter(
            "hybridmesh.router.shadow.dropped",
            description="Sampled shadow checks not made, by reason (busy, cloud_unavailable, "
            "failed)",
        )


class ShadowChecker:
    def __init__(
        self,
        settings: ShadowSettings,
        cloud: CloudTierApi,
        estimators: Mapping[str, EdgeErrorEstimator],
        *,
        tracer: trace.Tracer,
        meter: metrics.Meter | None = None,
        labels: LabelSink | None = None,
        bill: Billing | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._cloud = cloud
        self.estimators = estimators
        self._tracer = tracer
        self._metrics = ShadowMetrics(meter) if meter is not None else None
        self._labels = labels
        self._bill = bill
        self._rng = rng or random.Random()
        self.tasks: set[asyncio.Task[None]] = set()

    def sample(self, kept: KeptAnswers) -> tuple[int, ...]:
        """Positions (into ``kept.indices``) drawn for a check; none when not allowed."""
        if self.settings.rate <= 0 or not shadow_eligible(
            kept.privacy_class, kept.pair.anonymiser, internal=self.settings.internal
        ):
            return ()
        return tuple(p for p in range(len(kept.indices)) if self._rng.random() < self.settings.rate)

    def maybe_check(self, kept: KeptAnswers) -> asyncio.Task[None] | None:
        """Draw the sample and start its check in the background; returns its task (or
        None: nothing drawn, or dropped). Never raises, never waits."""
        positions = self.sample(kept)
        if not positions:
            return None
        pair = kept.pair.name
        if len(self.tasks) >= self.settings.max_in_flight:
            self._drop("busy", pair, len(positions))
            return None
        breaker = self._cloud.breaker
        if self._cloud.health.known_down or breaker.state is not BreakerState.CLOSED:
            self._drop("cloud_unavailable", pair, len(positions))
            return None
        # Created inside the request's span: the check's span joins its trace.
        task = asyncio.create_task(self._check(kept, positions, trace.get_current_span()))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _drop(self, reason: str, pair: str, items: int) -> None:
        if self._metrics is not None:
            self._metrics.dropped.add(items, {"reason": reason, "pair": pair})

    async def _check(
        self, kept: KeptAnswers, positions: tuple[int, ...], request_span: trace.Span
    ) -> None:
        indices = [kept.indices[p] for p in positions]
        request_id = shadow_request_id(kept.request_id)
        anonymiser = (
            "" if kept.privacy_class == routing_pb2.PRIVACY_CLASS_PUBLIC else kept.pair.anonymiser
        )
        tensor = encode_tensor(kept.pair.input_name, np.ascontiguousarray(kept.inputs[indices]))
        with self._tracer.start_as_current_span(
            "router.shadow_check", links=[trace.Link(request_span.get_span_context())]
        ) as span:
            span.set_attributes(
                {
                    attributes.REQUEST_ID: kept.request_id,
                    attributes.PAIR: kept.pair.name,
                    attributes.BATCH_SIZE: len(indices),
                    "hybridmesh.shadow": True,
                    attributes.DATA_LEFT_SITE: False,
                }
            )
            try:
                answer = await self._cloud.infer(
                    request_id=request_id,
                    model=kept.pair.cloud_model,
                    inputs=[tensor],
                    top_k=1,
                    timeout_s=self.settings.timeout_s,
                    privacy_class=kept.privacy_class,
                    anonymiser=anonymiser,
                    purpose=PURPOSE,
                    background=True,
                )
            except TierUnavailableError as error:
                span.set_attribute(attributes.DATA_LEFT_SITE, error.code is not None)
                reason = "failed" if error.sent else "cloud_unavailable"
                self._drop(reason, kept.pair.name, len(indices))
                return
            except Exception as error:  # a check must never take the router down
                _log.warning("shadow check failed", request_id=kept.request_id, error=str(error))
                self._drop("failed", kept.pair.name, len(indices))
                return
            span.set_attribute(attributes.DATA_LEFT_SITE, True)
            span.set_attribute(
                attributes.COST_MICROS, self.settings.cloud_price_micros * len(indices)
            )
        if self._metrics is not None:
            self._metrics.sent.add(len(indices), {"pair": kept.pair.name})
        if self._bill is not None:
            self._bill(self.settings.cloud_price_micros * len(indices), kept.pair.name)
        cloud_classes = [int(row.top_k[0].class_index) for row in answer.classifications]
        estimator = self.estimators.get(kept.pair.name)
        now = time.time()
        images = kept.inputs[indices]
        labels = []
        for row, position in enumerate(positions):
            edge_class = kept.edge_classes[position]
            if estimator is not None:
                estimator.observe(edge_class != cloud_classes[row], kept.scores[position])
            labels.append(
                ReconciledItem(
                    request_id=request_id,
                    item_index=kept.indices[position],
                    pair=kept.pair.name,
                    enqueued_at=now,
                    reconciled_at=now,
                    edge_model=kept.edge_model,
                    edge_class=edge_class,
                    cloud_model=f"{answer.model.name}:{answer.model.version}",
                    cloud_class=cloud_classes[row],
                    input=encode_tensor(
                        kept.pair.input_name, np.ascontiguousarray(images[row : row + 1])
                    ).SerializeToString(),
                    source=SOURCE,
                )
            )
        if self._labels is not None:
            try:
                await self._labels(labels)
            except Exception as error:  # the estimate is updated; only the labels are lost
                _log.error("shadow labels not recorded", request_id=request_id, error=str(error))

    async def drain(self) -> None:
        """Wait for the checks in flight (tests, and a stop that lets them finish)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
