"""The edge outbox: a durable, bounded queue of answers the cloud should still check.

SQLite in WAL mode on the site's persistent volume, one file holding three things:
``outbox`` (items waiting for the cloud), ``reconciled`` (the cloud's answer beside the
edge's for every reconciled item, with the item's input: the labelled examples for
retraining the router; ``source`` says whether reconciliation or a shadow check of a
kept answer produced it) and ``outbox_counts`` (their row counts, kept by triggers),
so a copy of the file is a consistent backup.

Bookkeeping costs the same at any depth and history: every query the router runs per
item is a lookup or a range over an index, and the counts ``stats`` reports are counters
kept by triggers in the same transaction as the rows they count, never a scan.

Bounded: at ``max_items`` a new item evicts the oldest item of the lowest priority
present, if that priority is not above its own; otherwise the new item is refused.
Either way the caller is told (``PutResult``) so it can count and log it: never a
silent drop. Reconciliation is exactly once per request id: the item is deleted and its
results inserted in one transaction, and a second completion of the same id is a no-op.

Synchronous, thread-safe (one connection behind a lock): the router calls it through
``asyncio.to_thread``. Times are wall-clock seconds (they must survive a restart).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    priority INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    pair TEXT NOT NULL,
    privacy_class INTEGER NOT NULL,
    top_k INTEGER NOT NULL,
    item_indices TEXT NOT NULL,
    edge_classes TEXT NOT NULL,
    edge_model TEXT NOT NULL,
    inputs BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
-- Eviction: the oldest item of the lowest priority.
CREATE INDEX IF NOT EXISTS outbox_by_priority ON outbox (priority, seq);
-- due(): per priority, the items whose next attempt is due, as a range of this index.
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (priority, next_attempt_at);
-- The oldest item's age is read often (a metric): min() over this index is O(log n).
CREATE INDEX IF NOT EXISTS outbox_by_enqueued_at ON outbox (enqueued_at);
CREATE TABLE IF NOT EXISTS reconciled (
    request_id TEXT NOT NULL,
    item_index INTEGER NOT NULL,
    pair TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    reconciled_at REAL NOT NULL,
    edge_model TEXT NOT NULL,
    edge_class INTEGER NOT NULL,
    cloud_model TEXT NOT NULL,
    cloud_class INTEGER NOT NULL,
    agrees INTEGER NOT NULL,
    input BLOB NOT NULL,
    source TEXT NOT NULL DEFAULT 'reconciliation',
    PRIMARY KEY (request_id, item_index)
);
-- Row counts kept by triggers in the writing transaction: stats() reads three rows.
CREATE TABLE IF NOT EXISTS outbox_counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS outbox_counts_put AFTER INSERT ON outbox BEGIN
    UPDATE outbox_counts SET value = value + 1 WHERE name = 'depth';
END;
CREATE TRIGGER IF NOT EXISTS outbox_counts_take AFTER DELETE ON outbox BEGIN
    UPDATE outbox_counts SET value = value - 1 WHERE name = 'depth';
END;
CREATE TRIGGER IF NOT EXISTS outbox_counts_reconciled AFTER INSERT ON reconciled BEGIN
    UPDATE outbox_counts SET value = value + 1 WHERE name = 'reconciled';
    UPDATE outbox_counts SET value = value + 1 WHERE name = 'corrections' AND NEW.agrees = 0;
END;
CREATE TRIGGER IF NOT EXISTS outbox_counts_trimmed AFTER DELETE ON reconciled BEGIN
    UPDATE outbox_counts SET value = value - 1 WHERE name = 'reconciled';
    UPDATE outbox_counts SET value = value - 1 WHERE name = 'corrections' AND OLD.agrees = 0;
END;
"""
# A file written before outbox_counts existed is counted once, when it is opened.
_COUNT_ROWS = """
SELECT 'depth', count(*) FROM outbox
    UNION ALL SELECT 'reconciled', count(*) FROM reconciled
    UNION ALL SELECT 'corrections', count(*) FROM reconciled WHERE agrees = 0
"""
_SEED_COUNTS = "INSERT OR IGNORE INTO outbox_counts (name, value)" + _COUNT_ROWS
_HAS_COUNTS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox_counts'"
# Files written before the ``source`` column had only reconciliation rows.
ADD_SOURCE = "ALTER TABLE reconciled ADD COLUMN source TEXT NOT NULL DEFAULT 'reconciliation'"
Synchronous = Literal["FULL", "NORMAL"]


class OutboxFileError(sqlite3.DatabaseError):
    """The outbox file is not an outbox SQLite can open (corrupt, truncated, another
    file): the message names it."""


class Priority(enum.IntEnum):
    """Higher survives longer when the outbox is full."""

    # A sample of edge-kept answers, for quality monitoring.
    SAMPLE = 0
    # A request that should have been escalated: its answer may be wrong.
    ESCALATION = 1


@dataclass(frozen=True)
class OutboxItem:
    request_id: str
    priority: Priority
    pair: str
    privacy_class: int
    top_k: int
    # Indices of the stored items in the caller's original batch.
    item_indices: tuple[int, ...]
    # The edge's top-1 class per stored item.
    edge_classes: tuple[int, ...]
    # "name:version" of the edge model that answered.
    edge_model: str
    # A serialized hybridmesh.common.v1.Tensor holding only the stored items.
    inputs: bytes
    enqueued_at: float = 0.0
    attempts: int = 0


@dataclass(frozen=True)
class ReconciledItem:
    request_id: str
    item_index: int
    pair: str
    enqueued_at: float
    reconciled_at: float
    edge_model: str
    edge_class: int
    cloud_model: str
    cloud_class: int
    # The item's input (a serialized Tensor of batch 1): with cloud_class, a labelled example.
    input: bytes
    # "reconciliation" (an outbox item) or "shadow" (a shadow check of a kept answer).
    source: str = "reconciliation"

    @property
    def agrees(self) -> bool:
        return self.edge_class == self.cloud_class


@dataclass(frozen=True)
class PutResult:
    stored: bool
    # Request ids evicted to make room (oldest of the lowest priority).
    evicted: tuple[str, ...] = ()
    # The request id was already queued (a retried request): nothing changed.
    duplicate: bool = False
    # The request id was already reconciled: nothing to do.
    already_reconciled: bool = False


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    oldest_age_s: float
    reconciled_items: int
    corrections: int


class Outbox:
    def __init__(
        self,
        path: Path,
        *,
        max_items: int,
        synchronous: Synchronous = "FULL",
        max_reconciled_rows: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_items = max_items
        self._max_reconciled = max_reconciled_rows
        self._clock = clock
        self._lock = threading.Lock()
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._open(synchronous)
        except sqlite3.OperationalError:  # locked, read-only, disk full: not the file's form
            self._db.close()
            raise
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise OutboxFileError(
                f"{path}: not a usable outbox ({error}); move it aside to start with an empty one"
            ) from error

    def _open(self, synchronous: Synchronous) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed item survives power loss; NORMAL: it survives a process
        # crash (kill -9) but the last commits may be lost on power loss.
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._transaction():
            for statement in _statements(SCHEMA):
                self._db.execute(statement)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(reconciled)")}
            if "source" not in columns:
                self._db.execute(ADD_SOURCE)
            self._db.execute(_SEED_COUNTS)
        self._depth = _stats(self._db, self._clock()).depth

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def depth(self) -> int:
        """Items waiting; kept in memory so metrics callbacks do no I/O."""
        return self._depth

    def put(self, item: OutboxItem) -> PutResult:
        now = self._clock()
        with self._lock, self._transaction():
            if self._queued(item.request_id):
                return PutResult(stored=False, duplicate=True)
            if self._reconciled(item.request_id):
                return PutResult(stored=False, already_reconciled=True)
            evicted: tuple[str, ...] = ()
            if self._depth >= self.max_items:
                victim = self._db.execute(VICTIM_QUERY).fetchone()
                if victim is None or victim[1] > item.priority:
                    return PutResult(stored=False)
                self._db.execute("DELETE FROM outbox WHERE request_id = ?", (victim[0],))
                self._depth -= 1
                evicted = (victim[0],)
            self._db.execute(
                "INSERT INTO outbox (request_id, priority, enqueued_at, pair, privacy_class,"
                " top_k, item_indices, edge_classes, edge_model, inputs, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item.request_id,
                    int(item.priority),
                    now,
                    item.pair,
                    item.privacy_class,
                    item.top_k,
                    json.dumps(list(item.item_indices)),
                    json.dumps(list(item.edge_classes)),
                    item.edge_model,
                    item.inputs,
                    now,
                ),
            )
            self._depth += 1
            return PutResult(stored=True, evicted=evicted)

    def due(self, limit: int) -> list[OutboxItem]:
        """Up to ``limit`` items whose next attempt is due: the highest priority first,
        within a priority the one due longest first (never tried: the oldest). One index
        range per priority, so items backing off cost nothing here."""
        rows: list[tuple[Any, ...]] = []
        with self._lock:
            now = self._clock()
            for priority in sorted(Priority, reverse=True):
                if len(rows) >= limit:
                    break
                rows += self._db.execute(DUE_QUERY, (int(priority), now, limit - len(rows)))
        return [_item(row) for row in rows]

    def defer(self, request_id: str, error: str, delay_s: float) -> None:
        """A failed attempt: try again after ``delay_s``."""
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
                " WHERE request_id = ?",
                (self._clock() + delay_s, error[:500], request_id),
            )

    def complete(self, request_id: str, results: Sequence[ReconciledItem]) -> bool:
        """Record the cloud's answers and remove the item, atomically. False when the item
        was not queued any more (already reconciled or evicted): nothing is recorded."""
        with self._lock, self._transaction():
            removed = self._db.execute(
                "DELETE FROM outbox WHERE request_id = ?", (request_id,)
            ).rowcount
            if removed == 0:
                return False
            self._depth -= removed
            self._insert_reconciled(results)
            return True

    def record(self, results: Sequence[ReconciledItem]) -> int:
        """Record labelled examples that never waited in the outbox (shadow checks); an
        (request id, item index) already recorded is kept as it is. Returns how many
        were new."""
        with self._lock, self._transaction():
            return self._insert_reconciled(results, or_ignore=True)

    def _insert_reconciled(
        self, results: Sequence[ReconciledItem], *, or_ignore: bool = False
    ) -> int:
        # rowcount, not total_changes: the counters' triggers change rows too.
        cursor = self._db.executemany(
            f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO reconciled (request_id,"
            " item_index, pair, enqueued_at, reconciled_at, edge_model, edge_class,"
            " cloud_model, cloud_class, agrees, input, source)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.request_id,
                    r.item_index,
                    r.pair,
                    r.enqueued_at,
                    r.reconciled_at,
                    r.edge_model,
                    r.edge_class,
                    r.cloud_model,
                    r.cloud_class,
                    int(r.agrees),
                    r.input,
                    r.source,
                )
                for r in results
            ],
        )
        inserted = cursor.rowcount
        # Keep the newest labelled examples only: the file stays bounded too.
        self._db.execute(TRIM_QUERY, (self._max_reconciled,))
        return inserted

    def oldest_age_s(self) -> float:
        """Age of the oldest waiting item in seconds (0 when empty), from an index: the
        same cost at any depth or history."""
        with self._lock:
            (oldest,) = self._db.execute(OLDEST_QUERY).fetchone()
        return 0.0 if oldest is None else max(self._clock() - oldest, 0.0)

    def stats(self) -> OutboxStats:
        """Depth, oldest age (s) and the kept history's counts (reconciled items, and
        those whose cloud answer differed): counters and one index lookup, no scan."""
        with self._lock:
            return _stats(self._db, self._clock())

    def reconciled(self, *, corrections_only: bool = False) -> list[ReconciledItem]:
        """Reconciled items, oldest first (the labelled examples)."""
        where = "WHERE agrees = 0" if corrections_only else ""
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, item_index, pair, enqueued_at, reconciled_at, edge_model,"
                f" edge_class, cloud_model, cloud_class, input, source FROM reconciled {where}"
                " ORDER BY rowid"
            ).fetchall()
        return [ReconciledItem(*row) for row in rows]

    def _queued(self, request_id: str) -> bool:
        found = self._db.execute("SELECT 1 FROM outbox WHERE request_id = ?", (request_id,))
        return found.fetchone() is not None

    def _reconciled(self, request_id: str) -> bool:
        found = self._db.execute(
            "SELECT 1 FROM reconciled WHERE request_id = ? LIMIT 1", (request_id,)
        )
        return found.fetchone() is not None

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


# The queries the router runs per item or per round; tests check their plans use an index.
DUE_QUERY = (
    "SELECT request_id, priority, pair, privacy_class, top_k, item_indices, edge_classes,"
    " edge_model, inputs, enqueued_at, attempts FROM outbox"
    " WHERE priority = ? AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
)
OLDEST_QUERY = "SELECT min(enqueued_at) FROM outbox"
VICTIM_QUERY = "SELECT request_id, priority FROM outbox ORDER BY priority, seq LIMIT 1"
# The history's oldest rows past the bound: a rowid range from its start.
TRIM_QUERY = "DELETE FROM reconciled WHERE rowid <= (SELECT max(rowid) FROM reconciled) - ?"
COUNTS_QUERY = "SELECT name, value FROM outbox_counts"


def _item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(
        request_id=row[0],
        priority=Priority(row[1]),
        pair=row[2],
        privacy_class=row[3],
        top_k=row[4],
        item_indices=tuple(json.loads(row[5])),
        edge_classes=tuple(json.loads(row[6])),
        edge_model=row[7],
        inputs=row[8],
        enqueued_at=row[9],
        attempts=row[10],
    )


def _statements(script: str) -> list[str]:
    """``script`` split into whole statements (a trigger body holds ``;`` too), so the
    schema is created inside one explicit transaction (executescript commits first)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return statements


def _stats(db: sqlite3.Connection, now: float, *, counted: bool = True) -> OutboxStats:
    """``counted``: the file has outbox_counts (else every row is counted, O(n))."""
    counts = dict(db.execute(COUNTS_QUERY if counted else _COUNT_ROWS).fetchall())
    (oldest,) = db.execute(OLDEST_QUERY).fetchone()
    return OutboxStats(
        depth=counts.get("depth", 0),
        oldest_age_s=0.0 if oldest is None else max(now - oldest, 0.0),
        reconciled_items=counts.get("reconciled", 0),
        corrections=counts.get("corrections", 0),
    )


def read_stats(path: Path, now: float | None = None) -> OutboxStats:
    """Stats of an outbox file another process owns (``hybridmesh status``), read-only:
    also a file of the previous release no process of this one has opened yet (no
    outbox_counts: its rows are counted). Raises sqlite3.Error for a file that is not an
    outbox (corrupt, truncated, empty)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        counted = db.execute(_HAS_COUNTS).fetchone() is not None
        return _stats(db, time.time() if now is None else now, counted=counted)
    finally:
        db.close()


def stranded(base: Path, in_use: Sequence[Path]) -> list[tuple[Path, int]]:
    """Outbox files beside ``base`` (``outbox.sqlite`` and ``outbox.worker<i>.sqlite``)
    that no process of this router drains (``in_use``: the workers' files) and that
    still hold queued items, with their depth. Each worker drains only its own file, so
    a router restarted with fewer (or more) workers leaves these behind; a file that
    cannot be read is left out (``hybridmesh status`` says it is unreadable)."""
    candidates = [base, *base.parent.glob(f"{base.stem}.worker*{base.suffix}")]
    found = []
    for path in sorted(set(candidates) - set(in_use)):
        if not path.is_file():
            continue
        try:
            depth = read_stats(path).depth
        except sqlite3.Error:
            continue
        if depth:
            found.append((path, depth))
    return found
