"""Typed service errors and their mapping to gRPC status with google.rpc details.

Domain code raises these; ``ErrorMappingInterceptor`` (services.interceptors) turns them into
the right status code, a message that names the field, and a ``google.rpc.BadRequest``
detail that clients in any language can read field by field.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

RETRY_PUSHBACK_METADATA_KEY = "grpc-retry-pushback-ms"  # gRFC A6 server pushback

# A caller's string echoed into a message is cut to this many characters.
ECHO_MAX_CHARS = 128
# Every status message is cut to this, whatever it echoes: the message travels twice in
# the trailers (grpc-message, percent-encoded, and grpc-status-details-bin), and trailers
# over the peer's limit (16 KiB by default) reach the caller as RESOURCE_EXHAUSTED
# "Stream removed" instead of the status meant for it.
MAX_MESSAGE_CHARS = 1024
# ... and to this many UTF-8 bytes: a non-ASCII byte costs 3 characters percent-encoded
# in grpc-message and 2 more in the base64 details (message and field description), so
# 1,024 characters of "é" or emoji (2-4 bytes each) passed gRPC's 8 KiB soft limit on
# received metadata and reached the caller as RESOURCE_EXHAUSTED "Stream removed".
MAX_MESSAGE_BYTES = 1024
ELLIPSIS = "…"


def clip(text: str, limit: int = ECHO_MAX_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when it was longer.

    Use it for every caller string a message or detail echoes (model, tensor, pair and
    file names...): ``f"no model {clip(name)!r}"``.
    """
    return text if len(text) <= limit else text[:limit] + ELLIPSIS


def clip_message(text: str) -> str:
    """``text`` cut to ``MAX_MESSAGE_CHARS`` characters and ``MAX_MESSAGE_BYTES`` UTF-8
    bytes (never inside a character), with an ellipsis when it was cut."""
    text = clip(text, MAX_MESSAGE_CHARS)
    encoded = text.encode()
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return text
    return encoded[:MAX_MESSAGE_BYTES].decode(errors="ignore") + ELLIPSIS


class ServiceError(Exception):
    """An error with a gRPC status; ``field`` names the offending request field."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        message = clip_message(message)
        self.message = f"{field}: {message}" if field else message
        self.field = field
        self.reason = message
        super().__init__(self.message)

    def to_status(self) -> grpc.Status:
        details: list[any_pb2.Any] = []
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=self.field, description=self.reason
            )
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            details.append(packed)
        status = status_pb2.Status(
            code=_CODE_NUMBERS[self.code], message=self.message, details=details
        )
        result: grpc.Status = rpc_status.to_status(status)
        return result

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class InvalidArgumentError(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhaustedError(ServiceError):
    """Overload; ``retry_after_ms`` is sent as gRFC A6 retry pushback."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self, message: str, *, field: str | None = None, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after_ms = retry_after_ms

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_ms is None:
            return ()
        return ((RETRY_PUSHBACK_METADATA_KEY, str(self.retry_after_ms)),)


class InternalError(ServiceError):
    code = grpc.StatusCode.INTERNAL


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: code_pb2.OK,
    grpc.StatusCode.CANCELLED: code_pb2.CANCELLED,
    grpc.StatusCode.UNKNOWN: code_pb2.UNKNOWN,
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE: code_pb2.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED: code_pb2.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: code_pb2.DATA_LOSS,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
}


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """Field -> description from a failed call's ``google.rpc.BadRequest`` detail."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    violations: dict[str, str] = {}
    if status is None:
        return violations
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                violations[violation.field] = violation.description
    return violations
