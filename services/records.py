"""Append-only JSON-lines records that must be kept (the router's audit trail of off-site
transfers, the cloud's intake log): written whatever the service's log level.

A ``RecordSink`` opens its file once (``O_APPEND``) and writes each record as one
``json.dumps`` line with one ``os.write`` call, so there is no user-space buffer to
flush and a record is in the kernel when ``write`` returns; with ``fsync`` (the default
for files) it is on the disk too. It does not go through structlog: the process-wide
level filter (``hybridmesh up`` runs services at "warning") never applies here.

A record that cannot be written is never dropped silently: the failure is logged at
error level, counted in ``hybridmesh.records.write_failures{stream}``, and raised as
``RecordWriteError`` (UNAVAILABLE), so the work it would have recorded does not go
ahead unrecorded.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from opentelemetry import metrics, trace

from services.errors import UnavailableError
from services.logging import get_logger

WRITE_FAILURES_METRIC = "hybridmesh.records.write_failures"

_log = get_logger("records")


class RecordWriteError(UnavailableError):
    """A record could not be written (disk full, file gone, sink closed)."""


class RecordSink:
    """One JSON line per record on its own file (or stdout), thread-safe, never filtered.

    Every line carries ``event``, ``stream`` (the sink's name), ``timestamp`` (ISO 8601,
    UTC) and, inside a span, ``trace_id`` / ``span_id``, then the record's own fields.
    """

    def __init__(
        self,
        fd: int,
        stream: str,
        *,
        fsync: bool = True,
        meter: metrics.Meter | None = None,
        owns_fd: bool = False,
        where: str = "",
    ) -> None:
        self.stream = stream
        self.where = where or f"fd {fd}"
        self._fd: int | None = fd
        self._owns_fd = owns_fd
        # fsync only means something for a regular file (a pipe or a tty refuses it).
        self._fsync = fsync and stat.S_ISREG(os.fstat(fd).st_mode)
        self._lock = threading.Lock()
        # After a failed write a partial line may be left: the next record starts on a
        # new line so it stays readable.
        self._torn = False
        self._failures = (
            meter.create_counter(
                WRITE_FAILURES_METRIC,
                description="records (audit, intake) that could not be written",
            )
            if meter is not None
            else None
        )

    @classmethod
    def open(
        cls,
        path: Path | None,
        stream: str,
        *,
        fsync: bool = True,
        meter: metrics.Meter | None = None,
    ) -> RecordSink:
        """Append to ``path`` (its folder created: a fresh volume has none); stdout when
        None, apart from the service's own log on stderr."""
        if path is None:
            return cls(sys.stdout.fileno(), stream, fsync=fsync, meter=meter, where="stdout")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return cls(fd, stream, fsync=fsync, meter=meter, owns_fd=True, where=str(path))

    @property
    def fsync(self) -> bool:
        return self._fsync

    def write(self, event: str, **fields: object) -> None:
        """Append one record; returns once it is written (and synced, with ``fsync``)."""
        record: dict[str, object] = {
            "event": event,
            **fields,
            "stream": self.stream,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record["trace_id"] = trace.format_trace_id(span_context.trace_id)
            record["span_id"] = trace.format_span_id(span_context.span_id)
        line = (json.dumps(record, default=str) + "\n").encode()
        with self._lock:
            try:
                if self._fd is None:
                    raise OSError("the record sink is closed")
                self._write_all(self._fd, b"\n" + line if self._torn else line)
                self._torn = False
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as error:
                self._torn = True
                self._failed(event, fields, error)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _failed(self, event: str, fields: dict[str, object], error: OSError) -> None:
        if self._failures is not None:
            self._failures.add(1, {"stream": self.stream})
        _log.error(
            "record not written",
            record_stream=self.stream,
            record_event=event,
            request_id=fields.get("request_id"),
            sink=self.where,
            error=str(error),
        )
        raise RecordWriteError(
            f"the {self.stream} record could not be written to {self.where}: {error}"
        ) from error

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None and self._owns_fd:
            os.close(fd)
