"""Issue 21 #4: outbox bookkeeping costs the same at any depth and history. On a real
SQLite file: every query the router runs per item or per drain round is planned over an
index (EXPLAIN QUERY PLAN), and the counts ``stats`` reads from counters stay equal to a
full count across put, complete, defer, eviction, trim and reopen."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from router_service.outbox import (
    DUE_QUERY,
    OLDEST_QUERY,
    TRIM_QUERY,
    VICTIM_QUERY,
    Outbox,
    OutboxStats,
    Priority,
    read_stats,
)
from tests.helpers.outbox_examples import item, results


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def plan(db: sqlite3.Connection, sql: str, args: tuple[object, ...] = ()) -> str:
    return " | ".join(str(row[-1]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args))


def counted(path: Path, now: float) -> OutboxStats:
    """The same figures by full scans: what the counters must equal."""
    db = sqlite3.connect(path)
    try:
        depth, oldest = db.execute("SELECT count(*), min(enqueued_at) FROM outbox").fetchone()
        history, corrections = db.execute(
            "SELECT count(*), coalesce(sum(agrees = 0), 0) FROM reconciled"
        ).fetchone()
    finally:
        db.close()
    age = 0.0 if oldest is None else now - oldest
    return OutboxStats(depth, age, history, corrections)


def test_request_path_queries_are_planned_over_an_index(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_items=1_000, max_reconciled_rows=100, clock=clock)
    for n in range(300):
        outbox.put(item(f"r{n}", Priority.SAMPLE if n % 3 else Priority.ESCALATION))
        clock.now += 0.01
    for n in range(0, 300, 2):
        outbox.complete(f"r{n}", results(f"r{n}", clock.now))
    outbox.close()
    db = sqlite3.connect(path)
    plans = {
        "due": plan(db, DUE_QUERY, (1, clock.now, 32)),
        "oldest": plan(db, OLDEST_QUERY),
        "victim": plan(db, VICTIM_QUERY),
        "trim": plan(db, TRIM_QUERY, (100,)),
        "queued": plan(db, "SELECT 1 FROM outbox WHERE request_id = ?", ("r1",)),
        "reconciled": plan(db, "SELECT 1 FROM reconciled WHERE request_id = ? LIMIT 1", ("r",)),
        "take": plan(db, "DELETE FROM outbox WHERE request_id = ?", ("r1",)),
        "defer": plan(
            db, "UPDATE outbox SET next_attempt_at = ? WHERE request_id = ?", (1.0, "r1")
        ),
    }
    db.close()
    assert "USING INDEX outbox_due (priority=? AND next_attempt_at<?)" in plans["due"]
    assert "USING COVERING INDEX outbox_by_enqueued_at" in plans["oldest"]
    assert "USING INDEX outbox_by_priority" in plans["victim"]
    assert "USING INTEGER PRIMARY KEY (rowid<?)" in plans["trim"]
    for name in ("queued", "reconciled", "take", "defer"):
        assert "(request_id=?)" in plans[name], plans[name]
    for name, text in plans.items():
        # A SCAN of a table without an index is a full scan; no temp sort either.
        for part in text.split(" | "):
            assert not (part.startswith("SCAN") and "INDEX" not in part), (name, text)
        assert "TEMP B-TREE" not in text, (name, text)


def test_stats_from_counters_match_a_full_count_through_every_change(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_items=5, max_reconciled_rows=4, clock=clock)

    def check() -> None:
        expected = counted(path, clock.now)
        assert outbox.stats() == expected
        assert read_stats(path, now=clock.now) == expected
        assert outbox.depth == expected.depth

    check()
    for n in range(4):
        outbox.put(item(f"esc-{n}"))
        clock.now += 1.0
    outbox.put(item("sample-0", Priority.SAMPLE))
    assert outbox.stats().depth == 5
    assert outbox.stats().oldest_age_s == pytest.approx(4.0)
    check()
    # Full: an escalation evicts the sample; another sample is refused.
    assert outbox.put(item("esc-4")).evicted == ("sample-0",)
    assert not outbox.put(item("sample-1", Priority.SAMPLE)).stored
    check()
    outbox.defer("esc-0", "cloud: unavailable", delay_s=30.0)
    check()
    # Each completion adds 2 rows, one of them a correction (results() disagrees on one).
    assert outbox.complete("esc-0", results("esc-0", clock.now))
    assert not outbox.complete("esc-0", results("esc-0", clock.now))  # no double count
    check()
    assert outbox.stats().reconciled_items == 2
    # A third completion passes the 4-row bound: the trim's deletions are counted too.
    for name in ("esc-1", "esc-2"):
        outbox.complete(name, results(name, clock.now))
    assert outbox.stats().reconciled_items == 4
    check()
    outbox.close()
    clock.now += 10.0
    outbox = Outbox(path, max_items=5, max_reconciled_rows=4, clock=clock)
    check()
    assert outbox.stats().depth == 2


def test_a_file_from_before_the_counters_is_counted_once_when_opened(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_items=10, clock=clock)
    for name in ("a", "b", "c"):
        outbox.put(item(name))
    outbox.complete("a", results("a", clock.now))
    outbox.close()
    db = sqlite3.connect(path)  # as an older router left it: no counters, no triggers
    for trigger in ("put", "take", "reconciled", "trimmed"):
        db.execute(f"DROP TRIGGER outbox_counts_{trigger}")
    db.execute("DROP TABLE outbox_counts")
    db.commit()
    db.close()
    outbox = Outbox(path, max_items=10, clock=clock)
    assert outbox.stats() == counted(path, clock.now)
    assert (outbox.depth, outbox.stats().reconciled_items, outbox.stats().corrections) == (2, 2, 1)
    outbox.put(item("d"))
    assert outbox.stats() == counted(path, clock.now)


def test_due_skips_items_backing_off_and_serves_the_longest_due_first(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.sqlite", max_items=10, clock=clock)
    for name in ("e1", "e2", "e3"):
        outbox.put(item(name))
        clock.now += 1.0
    outbox.put(item("s1", Priority.SAMPLE))
    outbox.defer("e1", "cloud: unavailable", delay_s=0.5)  # due again before e2, e3
    outbox.defer("e2", "cloud: unavailable", delay_s=60.0)
    clock.now += 1.0
    assert [i.request_id for i in outbox.due(10)] == ["e3", "e1", "s1"]
    assert [i.request_id for i in outbox.due(2)] == ["e3", "e1"]
    clock.now += 60.0
    assert [i.request_id for i in outbox.due(10)] == ["e3", "e1", "e2", "s1"]


def _as_the_previous_release_left_it(path: Path) -> None:
    """No counters and no triggers: the file before issue 21's bookkeeping."""
    db = sqlite3.connect(path)
    for trigger in ("put", "take", "reconciled", "trimmed"):
        db.execute(f"DROP TRIGGER outbox_counts_{trigger}")
    db.execute("DROP TABLE outbox_counts")
    db.commit()
    db.close()


def test_read_stats_of_a_file_no_router_of_this_release_opened(tmp_path: Path) -> None:
    """``hybridmesh status`` beside a mesh of the previous release: its outbox has no
    outbox_counts yet, and read_stats (read-only, it cannot create it) failed with
    "no such table" (a traceback from status). Its rows are counted instead."""
    clock = FakeClock()
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_items=10, clock=clock)
    for name in ("a", "b", "c"):
        outbox.put(item(name))
    outbox.complete("a", results("a", clock.now))
    outbox.close()
    _as_the_previous_release_left_it(path)
    assert read_stats(path, clock.now) == counted(path, clock.now)
    assert read_stats(path, clock.now).depth == 2


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "empty"])
def test_read_stats_of_a_damaged_file_raises_sqlite_error(damage: str, tmp_path: Path) -> None:
    """What ``hybridmesh status`` catches to say "unreadable" for that worker's file."""
    clock = FakeClock()
    path = tmp_path / "o.sqlite"
    outbox = Outbox(path, max_items=10, clock=clock)
    for name in ("a", "b"):
        outbox.put(item(name))
    outbox.close()
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(bytes(data[:1000]))
    elif damage == "overwritten":
        data[100:4000] = b"\xff" * 3900
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")
    with pytest.raises(sqlite3.Error):
        read_stats(path, clock.now)
