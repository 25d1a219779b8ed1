"""Correction events: fan-out of reconciled disagreements to WatchCorrections streams.

A watch is endless until the router drains: then ``CorrectionFeed.close`` ends every watch
with UNAVAILABLE "server shutting down" (and refuses new ones), so a stop is not held up by
idle streams. UNAVAILABLE, not OK: the feed has not ended, this server has; it is the code a
client already treats as "reconnect" (to another replica, with ``include_recorded`` to
replay what it missed), and the one gRPC itself gives calls it cancels at the end of grace.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager

from google.protobuf import timestamp_pb2

from hybridmesh.common.v1 import model_pb2
from hybridmesh.router.v1 import router_service_pb2
from router_service.outbox import ReconciledItem
from services.errors import ResourceExhaustedError, UnavailableError

# A subscriber this far behind is cut off rather than holding memory without bound.
SUBSCRIBER_BUFFER = 1024
SHUTTING_DOWN = "server shutting down; watch again (include_recorded replays what was missed)"


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
        # None wakes a waiting watch to see ``closed``.
        self.queue: asyncio.Queue[router_service_pb2.Correction | None] = asyncio.Queue(
            SUBSCRIBER_BUFFER
        )
        self.overflowed = False
        self.closed = False


class CorrectionFeed:
    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """Draining: end every watch now (UNAVAILABLE) and refuse new ones."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber.closed = True
            with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes it anyway
                subscriber.queue.put_nowait(None)

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
        if self._closed:
            raise UnavailableError(SHUTTING_DOWN)
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
                if subscriber.closed:
                    raise UnavailableError(SHUTTING_DOWN)
                if subscriber.overflowed and subscriber.queue.empty():
                    raise ResourceExhaustedError(
                        f"subscriber fell {SUBSCRIBER_BUFFER} corrections behind; resubscribe"
                    )
                event = await subscriber.queue.get()
                if event is not None:
                    yield event
