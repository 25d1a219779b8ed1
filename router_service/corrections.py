"""Correction events: fan-out of reconciled disagreements to WatchCorrections streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager

from google.protobuf import timestamp_pb2

from hybridmesh.common.v1 import model_pb2
from hybridmesh.router.v1 import router_service_pb2
from router_service.outbox import ReconciledItem
from services.errors import ResourceExhaustedError

# A subscriber this far behind is cut off rather than holding memory without bound.
SUBSCRIBER_BUFFER = 1024


def _model(name_version: str) -> model_pb2.ModelRef:
    name, _, version = name_version.partition(":")
    return model_pb2.ModelRef(name=name, version=version)


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def correction_event(item: ReconciledItem) -> router_service_pb2.Correction:
    return router_service_pb2.Correction(
        request_id=item.request_id,
        item_index=item.item_index,
        model=item.pair,
        edge_class=item.edge_class,
        cloud_class=item.cloud_class,
        edge_model=_model(item.edge_model),
        cloud_model=_model(item.cloud_model),
        queued_at=_timestamp(item.enqueued_at),
        reconciled_at=_timestamp(item.reconciled_at),
    )


class _Subscriber:
    def __init__(self, model: str) -> None:
        self.model = model
        self.queue: asyncio.Queue[router_service_pb2.Correction] = asyncio.Queue(SUBSCRIBER_BUFFER)
        self.overflowed = False


class CorrectionFeed:
    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, items: Iterable[ReconciledItem]) -> None:
        for item in items:
            if item.agrees:
                continue
            event = correction_event(item)
            for subscriber in self._subscribers:
                if subscriber.model and subscriber.model != item.pair:
                    continue
                try:
                    subscriber.queue.put_nowait(event)
                except asyncio.QueueFull:
                    subscriber.overflowed = True

    @contextmanager
    def _subscribe(self, model: str) -> Iterator[_Subscriber]:
        subscriber = _Subscriber(model)
        self._subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)

    async def watch(
        self, model: str, recorded: Iterable[ReconciledItem]
    ) -> AsyncIterator[router_service_pb2.Correction]:
        """``recorded`` first (already filtered to corrections), then live events."""
        # Subscribe before replaying, so nothing reconciled in between is missed (an
        # item may then arrive twice; the request id and item index identify it).
        with self._subscribe(model) as subscriber:
            for item in recorded:
                if not item.agrees and (not model or item.pair == model):
                    yield correction_event(item)
            while True:
                if subscriber.overflowed and subscriber.queue.empty():
                    raise ResourceExhaustedError(
                        f"subscriber fell {SUBSCRIBER_BUFFER} corrections behind; resubscribe"
                    )
                yield await subscriber.queue.get()
