"""The outbox on a real SQLite file: durable across reopen, bounded with the stated
eviction policy, exactly-once completion, backoff, stats readable by another process."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from router_service.corrections import SUBSCRIBER_BUFFER, CorrectionFeed
from router_service.outbox import (
    Outbox,
    OutboxFileError,
    Priority,
    ReconciledItem,
    read_stats,
)
from router_service.reconciler import backoff_s, sampled
from services.errors import ResourceExhaustedError
from tests.helpers.outbox_examples import item, results


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_items_survive_reopen_and_wal_is_on(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, max_items=10)
    assert outbox.put(item("a")).stored
    outbox.close()  # and a crash: every put is committed before it returns
    reopened = Outbox(path, max_items=10)
    assert reopened.depth == 1
    (stored,) = reopened.due(10)
    assert stored.request_id == "a"
    assert stored.item_indices == (0, 2) and stored.edge_classes == (3, 4)
    assert stored.inputs == b"tensor-bytes"
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_put_of_a_queued_request_id_is_a_duplicate(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", max_items=10)
    assert outbox.put(item("a")).stored
    again = outbox.put(item("a"))
    assert again.duplicate and not again.stored
    assert outbox.depth == 1


def test_full_outbox_evicts_oldest_of_lowest_priority(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.sqlite", max_items=3, clock=clock)
    outbox.put(item("esc-1"))
    outbox.put(item("sample-1", Priority.SAMPLE))
    outbox.put(item("sample-2", Priority.SAMPLE))
    # Full: an escalation evicts the oldest sample, not the older escalation.
    result = outbox.put(item("esc-2"))
    assert result.stored and result.evicted == ("sample-1",)
    # A sample evicts the remaining (older) sample.
    assert outbox.put(item("sample-3", Priority.SAMPLE)).evicted == ("sample-2",)
    assert outbox.put(item("esc-3")).evicted == ("sample-3",)
    # Full of escalations: a sample is refused, an escalation evicts the oldest one.
    refused = outbox.put(item("sample-4", Priority.SAMPLE))
    assert not refused.stored and not refused.duplicate and refused.evicted == ()
    assert outbox.put(item("esc-4")).evicted == ("esc-1",)
    assert sorted(i.request_id for i in outbox.due(10)) == ["esc-2", "esc-3", "esc-4"]
    assert outbox.depth == 3


def test_complete_is_exactly_once_and_keeps_labelled_examples(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.sqlite", max_items=10, clock=clock)
    outbox.put(item("a"))
    assert outbox.complete("a", results("a", clock.now))
    assert not outbox.complete("a", results("a", clock.now))  # a second completion: no-op
    assert outbox.depth == 0
    examples = outbox.reconciled()
    assert [(r.item_index, r.edge_class, r.cloud_class) for r in examples] == [(0, 3, 3), (2, 4, 5)]
    assert [r.item_index for r in outbox.reconciled(corrections_only=True)] == [2]
    # A retried request whose id was already reconciled is not queued again.
    again = outbox.put(item("a"))
    assert again.already_reconciled and not again.stored and not again.duplicate
    stats = outbox.stats()
    assert (stats.depth, stats.reconciled_items, stats.corrections) == (0, 2, 1)


def test_defer_backs_off_and_due_orders_by_priority(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.sqlite", max_items=10, clock=clock)
    outbox.put(item("sample", Priority.SAMPLE))
    outbox.put(item("esc"))
    assert [i.request_id for i in outbox.due(10)] == ["esc", "sample"]
    outbox.defer("esc", "cloud: unavailable", delay_s=5.0)
    assert [i.request_id for i in outbox.due(10)] == ["sample"]
    clock.now += 5.0
    (first, _) = outbox.due(10)
    assert first.request_id == "esc" and first.attempts == 1


def test_stats_age_and_read_only_view_from_another_process(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_items=10, clock=clock)
    outbox.put(item("a"))
    clock.now += 7.5
    outbox.put(item("b"))
    assert outbox.stats().oldest_age_s == pytest.approx(7.5)
    assert read_stats(path, now=clock.now).depth == 2
    # The writer stays open; a separate process reads the WAL file consistently.
    code = (
        "import sys; from pathlib import Path; from router_service.outbox import read_stats;"
        f"print(read_stats(Path({str(path)!r})).depth)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"


def test_the_oldest_age_is_read_from_an_index_whatever_the_depth(tmp_path: Path) -> None:
    """Issue 21 #4: outbox bookkeeping costs the same at any depth and history: the age
    the worker reads is min() over an index (no scan), not ``stats()``."""
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.sqlite", max_items=10, clock=clock)
    assert outbox.oldest_age_s() == 0.0
    outbox.put(item("a"))
    clock.now += 3.0
    outbox.put(item("b"))
    assert outbox.oldest_age_s() == pytest.approx(3.0)
    db = sqlite3.connect(tmp_path / "o.sqlite")
    plan = " ".join(
        str(row[-1]) for row in db.execute("EXPLAIN QUERY PLAN SELECT min(enqueued_at) FROM outbox")
    )
    db.close()
    assert "outbox_by_enqueued_at" in plan, plan
    assert "SCAN outbox" not in plan


def test_reconciled_rows_are_bounded(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.sqlite", max_items=10, max_reconciled_rows=3, clock=clock)
    for name in ("a", "b", "c"):
        outbox.put(item(name))
        outbox.complete(name, results(name, clock.now))
    assert [(r.request_id, r.item_index) for r in outbox.reconciled()] == [
        ("b", 2),
        ("c", 0),
        ("c", 2),
    ]


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    assert [backoff_s(n, 1.0, 60.0, 0.0) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_s(2, 1.0, 60.0, 0.999) == pytest.approx(4 * 1.25, rel=1e-3)
    assert backoff_s(10_000, 1.0, 60.0, 0.0) == 60.0


def test_sampling_is_stable_per_request_id_and_near_the_rate() -> None:
    ids = [f"request-{n}" for n in range(10_000)]
    chosen = [request_id for request_id in ids if sampled(request_id, 0.1)]
    assert 0.08 < len(chosen) / len(ids) < 0.12
    assert chosen == [request_id for request_id in ids if sampled(request_id, 0.1)]
    assert not any(sampled(request_id, 0.0) for request_id in ids[:100])
    assert all(sampled(request_id, 1.0) for request_id in ids[:100])


async def test_a_subscriber_gets_recorded_then_live_corrections_and_is_cut_off_when_behind() -> (
    None
):
    feed = CorrectionFeed()
    clock = FakeClock()
    recorded = results("old", clock.now)  # item 0 agrees, item 2 is a correction
    stream = feed.watch("fashion-mnist", recorded)
    first = await anext(stream)
    assert (first.request_id, first.item_index, first.cloud_class) == ("old", 2, 5)
    # Live events for another pair are not delivered; then the subscriber falls behind.
    other = [
        ReconciledItem("x", 0, "other-pair", 1.0, 2.0, "e:1", 1, "c:1", 2, b"x"),
    ]
    feed.publish(other)
    for n in range(SUBSCRIBER_BUFFER + 1):
        feed.publish(results(f"live-{n}", clock.now))
    delivered = [await anext(stream) for _ in range(SUBSCRIBER_BUFFER)]
    assert delivered[0].request_id == "live-0" and delivered[-1].model == "fashion-mnist"
    with pytest.raises(ResourceExhaustedError, match="behind"):
        await anext(stream)
    assert feed.subscribers == 0


@pytest.mark.parametrize("content", [b"\xff" * 8192, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_file_that_is_not_an_outbox_is_named_when_opened(content: bytes, tmp_path: Path) -> None:
    """The router's start-up failed with a bare "file is not a database", naming no file."""
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(content)
    with pytest.raises(OutboxFileError, match=f"^{path}: not a usable outbox"):
        Outbox(path, max_items=10)
    assert path.read_bytes() == content, "left as it was, for whoever looks into it"
