"""Checks every service applies to request fields before using or storing them.

Enums: proto3 enums are open, so a caller can send any int32 (42, -1) and the generated
``Name()`` raises ValueError on it; every enum field is checked against its defined
values first. Timestamps and durations: checked against the range google.protobuf
defines for them (years 1..9999, +-10,000 years), so nothing stored can later fail to
convert back (a stored out-of-range time used to break every listing).
"""

from __future__ import annotations

import math

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor

from services.errors import InvalidArgumentError

# google/protobuf/timestamp.proto: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
# google/protobuf/duration.proto: +-10,000 years
DURATION_MAX_SECONDS = 315_576_000_000
NANOS_PER_SECOND = 1_000_000_000


def check_enum(value: int, enum: EnumDescriptor, field: str) -> None:
    """INVALID_ARGUMENT naming ``field`` unless ``value`` is one of the enum's numbers
    (``enum`` is the generated enum's descriptor: ``tensor_pb2.DataType.DESCRIPTOR``)."""
    if value not in enum.values_by_number:
        raise InvalidArgumentError(
            f"unknown {enum.name} value {value}; defined: {sorted(enum.values_by_number)}",
            field=field,
        )


def enum_name(enum: EnumDescriptor, value: int) -> str:
    """The value's name, or its number for a value the contract does not define (for
    logs and span attributes, which must never fail on a caller's value)."""
    known = enum.values_by_number.get(value)
    return known.name if known is not None else str(value)


def check_timestamp(stamp: timestamp_pb2.Timestamp, field: str) -> None:
    """INVALID_ARGUMENT unless ``stamp`` is within years 1..9999 with valid nanos."""
    if not TIMESTAMP_MIN_SECONDS <= stamp.seconds <= TIMESTAMP_MAX_SECONDS:
        raise InvalidArgumentError(
            f"seconds {stamp.seconds} is outside 0001-01-01..9999-12-31", field=f"{field}.seconds"
        )
    if not 0 <= stamp.nanos < NANOS_PER_SECOND:
        raise InvalidArgumentError(
            f"nanos {stamp.nanos} is outside 0..999999999", field=f"{field}.nanos"
        )


def check_duration(
    duration: duration_pb2.Duration,
    field: str,
    *,
    min_seconds: float = -DURATION_MAX_SECONDS,
    max_seconds: float = DURATION_MAX_SECONDS,
) -> float:
    """The duration in seconds, after checking it is valid and within the given range."""
    seconds, nanos = duration.seconds, duration.nanos
    valid = (
        abs(seconds) <= DURATION_MAX_SECONDS
        and abs(nanos) < NANOS_PER_SECOND
        and not (seconds > 0 > nanos or seconds < 0 < nanos)
    )
    if not valid:
        raise InvalidArgumentError(f"{seconds}s {nanos}ns is not a valid duration", field=field)
    value = seconds + nanos / NANOS_PER_SECOND
    if not min_seconds <= value <= max_seconds:
        raise InvalidArgumentError(
            f"{value:g}s is outside {min_seconds:g}s..{max_seconds:g}s", field=field
        )
    return value


def unix_seconds(stamp: timestamp_pb2.Timestamp) -> float:
    """A checked timestamp as float unix seconds (what the services store)."""
    return stamp.seconds + stamp.nanos / NANOS_PER_SECOND


def timestamp_at(seconds: float) -> timestamp_pb2.Timestamp:
    """Float unix seconds as a Timestamp, clamped into the valid range: a float near the
    ends of the range rounds past them, and the conversion must never fail a listing."""
    if not math.isfinite(seconds):
        raise ValueError(f"not a time: {seconds}")
    whole = min(max(math.floor(seconds), TIMESTAMP_MIN_SECONDS), TIMESTAMP_MAX_SECONDS)
    nanos = min(max(int((seconds - whole) * NANOS_PER_SECOND), 0), NANOS_PER_SECOND - 1)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=nanos)
