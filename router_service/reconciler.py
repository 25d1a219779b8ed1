"""Reconciliation: queue would-be escalations while the cloud is out, drain them when it
is back, record the cloud's answer beside the edge's, publish the disagreements.

Idempotent end to end: the outbox is keyed by request id (a retried request is not
queued twice), the cloud deduplicates replays by request id and payload, and an item is
removed and its results recorded in one transaction. Paced by an adaptive rate
(router_service.drain_rate: as fast as the replays' latency and the cloud's retry
pushback allow, so a recovering cloud is not stampeded by the backlog and live traffic
keeps its latency) and backing off per item.

The worker's bookkeeping costs the same at any depth: it does not wake while the cloud
is out (enqueues during an outage only write the item), runs at most
``MAX_ROUNDS_PER_S`` rounds a second, and reads the oldest item's age from an index at
most once per ``AGE_REFRESH_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from opentelemetry import metrics, trace

from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from router_service.breaker import BreakerState
from router_service.config import RouterSettings
from router_service.corrections import CorrectionFeed
from router_service.drain_rate import DrainRateController
from router_service.metrics import observe_drain_rate
from router_service.outbox import Outbox, OutboxItem, Priority, ReconciledItem
from router_service.tier_api import CloudTierApi, TierUnavailableError
from services.errors import ServiceError
from services.logging import get_logger
from services.tensors import DATATYPE_TO_NUMPY, encode_tensor

# The outbox age metric is read at most this often (seconds).
AGE_REFRESH_S = 1.0
# The worker's rounds (a due() query, an age refresh) at most this often, however many
# enqueues wake it.
MAX_ROUNDS_PER_S = 20.0

_log = get_logger("router_service.reconciler")


def backoff_s(attempts: int, base_s: float, max_s: float, jitter: float) -> float:
    """Exponential backoff after ``attempts`` failures; ``jitter`` in [0, 1) spreads
    items that failed together (up to +25 %)."""
    return float(min(max_s, base_s * 2.0 ** min(attempts, 30)) * (1.0 + 0.25 * jitter))


def sampled(request_id: str, rate: float) -> bool:
    """Stable per request id, so a retried request is sampled the same way."""
    return rate > 0 and zlib.crc32(request_id.encode()) / 2**32 < rate


@dataclass(frozen=True)
class PairRoute:
    """What reconciliation needs to know about a pair."""

    cloud_model: str
    anonymiser: str


class OutboxMetrics:
    def __init__(self, meter: metrics.Meter, outbox: Outbox) -> None:
        self._outbox = outbox
        self._oldest_s = 0.0
        meter.create_observable_gauge(
            "hybridmesh.outbox.depth",
            callbacks=[lambda _: [metrics.Observation(outbox.depth)]],
            description="Items waiting in the edge outbox",
        )
        meter.create_observable_gauge(
            "hybridmesh.outbox.oldest_age",
            unit="s",
            callbacks=[lambda _: [metrics.Observation(self._oldest_s)]],
            description="Age of the oldest item in the edge outbox",
        )
        self.enqueued = meter.create_counter(
            "hybridmesh.outbox.enqueued", description="Requests queued, by priority"
        )
        self.dropped = meter.create_counter(
            "hybridmesh.outbox.dropped",
            description="Requests evicted or refused by a full outbox, or not stored",
        )
        self.reconciled = meter.create_counter(
            "hybridmesh.outbox.reconciled_items", description="Items reconciled with the cloud"
        )
        self.corrections = meter.create_counter(
            "hybridmesh.outbox.corrections",
            description="Reconciled items whose cloud answer differs from the edge answer",
        )
        self.attempt_failures = meter.create_counter(
            "hybridmesh.outbox.attempt_failures", description="Failed reconciliation attempts"
        )

    def refresh_age(self, oldest_age_s: float) -> None:
        self._oldest_s = oldest_age_s


class Reconciler:
    def __init__(
        self,
        settings: RouterSettings,
        outbox: Outbox,
        cloud: CloudTierApi,
        pairs: Mapping[str, PairRoute],
        *,
        cloud_ready: Callable[[], bool],
        tracer: trace.Tracer,
        meter: metrics.Meter,
        feed: CorrectionFeed | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self.outbox = outbox
        self._cloud = cloud
        self._pairs = dict(pairs)
        self._cloud_ready = cloud_ready
        self._tracer = tracer
        self.metrics = OutboxMetrics(meter, outbox)
        self.feed = feed or CorrectionFeed()
        self.rate = DrainRateController(settings.drain_rate_config(), clock)
        observe_drain_rate(meter, self.rate)
        self._wake = asyncio.Event()
        self._age_refreshed_at = -AGE_REFRESH_S

    async def enqueue(self, item: OutboxItem) -> bool:
        """Store an item; True when it is in the outbox. Never raises: the caller's
        answer is already there, and losing the reconciliation is logged and counted."""
        if item.privacy_class == routing_pb2.PRIVACY_CLASS_SENSITIVE:
            # SENSITIVE data never leaves, so there is nothing to reconcile.
            return False
        priority = item.priority.name.lower()
        try:
            result = await asyncio.to_thread(self.outbox.put, item)
        except Exception as error:
            _log.error("outbox write failed", request_id=item.request_id, error=str(error))
            self.metrics.dropped.add(1, {"reason": "write_failed", "priority": priority})
            return False
        for evicted in result.evicted:
            _log.warning(
                "outbox full: evicted the oldest low-priority item",
                evicted=evicted,
                for_request=item.request_id,
                max_items=self.outbox.max_items,
            )
            self.metrics.dropped.add(1, {"reason": "evicted", "priority": priority})
        if not (result.stored or result.duplicate or result.already_reconciled):
            _log.warning(
                "outbox full of higher-priority items: not queued",
                request_id=item.request_id,
                max_items=self.outbox.max_items,
            )
            self.metrics.dropped.add(1, {"reason": "refused", "priority": priority})
        if result.stored:
            self.metrics.enqueued.add(1, {"priority": priority})
            if self._cloud_ready():  # while the cloud is out, the idle poll is enough
                self._wake.set()
        return result.stored or result.duplicate

    async def run(self) -> None:
        """The worker: drain while the cloud is ready, otherwise wait (woken by an
        enqueue, or every ``drain_idle_s``), at most ``MAX_ROUNDS_PER_S`` rounds a second."""
        while True:
            started = time.monotonic()
            drained = 0
            try:
                if self._cloud_ready():
                    drained = await self.drain_once()
                await self._refresh_age()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("reconciliation round failed")
            if drained == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.drain_idle_s)
            # A burst of enqueues (or a round that found nothing due) costs one round per
            # interval, not one per item.
            await asyncio.sleep(max(0.0, started + 1.0 / MAX_ROUNDS_PER_S - time.monotonic()))

    async def _refresh_age(self) -> None:
        """The oldest item's age for the metric, at most once per AGE_REFRESH_S: every
        enqueue wakes the worker, so an outage would otherwise read it per escalation."""
        now = time.monotonic()
        if now - self._age_refreshed_at < AGE_REFRESH_S:
            return
        self._age_refreshed_at = now
        self.metrics.refresh_age(await asyncio.to_thread(self.outbox.oldest_age_s))

    async def drain_once(self) -> int:
        """Reconcile the due items, rate-limited, up to ``drain_concurrency`` at a time
        (so the WAN's round trip does not bound the rate); stop at the first cloud
        failure (the cloud is likely down again). Returns how many items were handled
        (reconciled, or deferred for a reason that is not the cloud's)."""
        items = await asyncio.to_thread(self.outbox.due, self._settings.drain_batch)
        breaker = self._cloud.breaker
        if items and breaker.state is BreakerState.HALF_OPEN:
            # Replays are background work, refused by a half-open breaker: its probes are
            # live traffic's. On a quiet site no live call probes, so one replay at a
            # time goes as a probe, only while no other probe is in flight; otherwise
            # the outbox would wait for live traffic to close the breaker.
            if breaker.probes_in_flight:
                return 0
            return int(await self._reconcile(items[0], probe=True))
        slots = asyncio.Semaphore(self._settings.drain_concurrency)
        cloud_failed = asyncio.Event()

        async def one(item: OutboxItem) -> bool:
            async with slots:
                if cloud_failed.is_set() or not self._cloud_ready():
                    return False
                wait = self.rate.wait_s()
                if wait > 0:
                    await asyncio.sleep(wait)
                    if cloud_failed.is_set():  # another replay failed while this one waited
                        return False
                reconciled = await self._reconcile(item)
                if not reconciled:
                    cloud_failed.set()
                return reconciled

        return sum(await asyncio.gather(*(one(item) for item in items)))

    async def _reconcile(self, item: OutboxItem, *, probe: bool = False) -> bool:
        route = self._pairs.get(item.pair)
        tensor = tensor_pb2.Tensor.FromString(item.inputs)
        with self._tracer.start_as_current_span("router.reconcile") as span:
            span.set_attribute("hybridmesh.request_id", item.request_id)
            span.set_attribute("hybridmesh.pair", item.pair)
            span.set_attribute("hybridmesh.attempt", item.attempts + 1)
            span.set_attribute("hybridmesh.data_left_site", False)
            if route is None:
                await self._defer(item, f"model pair {item.pair!r} is not configured")
                return True  # not the cloud's fault: go on with the others
            public = item.privacy_class == routing_pb2.PRIVACY_CLASS_PUBLIC
            try:
                answer = await self._cloud.infer(
                    request_id=item.request_id,
                    model=route.cloud_model,
                    inputs=[tensor],
                    top_k=item.top_k,
                    timeout_s=self._settings.drain_timeout_s,
                    privacy_class=item.privacy_class,  # type: ignore[arg-type]
                    anonymiser="" if public else route.anonymiser,
                    purpose="reconciliation",
                    reconciliation=True,
                    background=not probe,
                )
            except TierUnavailableError as error:
                span.set_attribute("hybridmesh.data_left_site", error.code is not None)
                if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    if error.retry_pushback_s is not None:
                        span.set_attribute(
                            "hybridmesh.retry_pushback_ms", round(error.retry_pushback_s * 1e3)
                        )
                    self.rate.pushback(error.retry_pushback_s)
                elif error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self.rate.timed_out()
                await self._defer(item, str(error))
                return False
            except ServiceError as error:
                await self._defer(item, str(error))
                return True
            span.set_attribute("hybridmesh.data_left_site", True)
            if not probe:  # a probe's latency is that of a cloud just back, alone
                self.rate.observe(answer.elapsed_s)
        results = self._results(item, tensor, answer.classifications, answer.model)
        if await asyncio.to_thread(self.outbox.complete, item.request_id, results):
            disagreements = [r for r in results if not r.agrees]
            self.metrics.reconciled.add(len(results), {"pair": item.pair})
            if disagreements:
                self.metrics.corrections.add(len(disagreements), {"pair": item.pair})
            self.feed.publish(disagreements)
            _log.info(
                "reconciled",
                request_id=item.request_id,
                items=len(results),
                corrections=len(disagreements),
                attempts=item.attempts + 1,
            )
        return True

    async def _defer(self, item: OutboxItem, error: str) -> None:
        delay = backoff_s(
            item.attempts,
            self._settings.drain_backoff_base_s,
            self._settings.drain_backoff_max_s,
            random.random(),
        )
        self.metrics.attempt_failures.add(1, {"pair": item.pair})
        _log.warning(
            "reconciliation failed; backing off",
            request_id=item.request_id,
            error=error,
            retry_in_s=round(delay, 2),
        )
        await asyncio.to_thread(self.outbox.defer, item.request_id, error, delay)

    @staticmethod
    def _results(
        item: OutboxItem,
        tensor: tensor_pb2.Tensor,
        rows: Sequence[model_pb2.Classification],
        cloud_model: model_pb2.ModelRef,
    ) -> list[ReconciledItem]:
        images = np.frombuffer(
            tensor.raw_contents, dtype=DATATYPE_TO_NUMPY[tensor.datatype]
        ).reshape(list(tensor.shape))
        now = time.time()
        return [
            ReconciledItem(
                request_id=item.request_id,
                item_index=index,
                pair=item.pair,
                enqueued_at=item.enqueued_at,
                reconciled_at=now,
                edge_model=item.edge_model,
                edge_class=edge_class,
                cloud_model=f"{cloud_model.name}:{cloud_model.version}",
                cloud_class=int(row.top_k[0].class_index),
                input=encode_tensor(
                    tensor.name, images[position : position + 1]
                ).SerializeToString(),
            )
            for position, (index, edge_class, row) in enumerate(
                zip(item.item_indices, item.edge_classes, rows, strict=True)
            )
        ]


__all__ = ["PairRoute", "Priority", "Reconciler", "backoff_s", "sampled"]
