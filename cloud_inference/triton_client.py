"""A small typed facade over tritonclient.grpc.aio, with Triton's errors mapped to ours.

One InferenceServerClient per process. tritonclient has no type stubs; everything it
returns is converted here so the rest of the service stays typed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from services.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
    clip,
)

DEFAULT_RETRY_AFTER_MS = 50
# tritonclient's own defaults plus: keepalive, so a silently dead Triton connection is
# noticed when idle, and a short reconnect backoff, so a restarted Triton is found again
# within about a second instead of gRPC's default of up to two minutes.
CHANNEL_ARGS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


@dataclass(frozen=True)
class TritonTensor:
    name: str
    datatype: str  # KServe v2 name, e.g. "UINT8"
    shape: tuple[int, ...]  # -1 for a dynamic dimension, batch dimension included


@dataclass(frozen=True)
class TritonModel:
    name: str
    versions: tuple[str, ...]
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    max_batch_size: int

    @property
    def served_version(self) -> str:
        """The newest version Triton serves (versions are integers, sent as strings)."""
        return max(self.versions, key=lambda v: (len(v), v), default="")


def map_triton_failure(
    status: str, message: str, model: str, retry_after_ms: int = DEFAULT_RETRY_AFTER_MS
) -> ServiceError:
    """Triton's failure (gRPC status name + message) -> the status our callers should see.

    Triton reports a full queue and an expired request timeout as UNAVAILABLE (seen with
    the bundled 2.x build: "Exceeds maximum queue size", "Request timeout expired"); our
    callers must retry the first later and not at all the second, so both are told apart
    by their message before the status decides.
    """
    status = status.removeprefix("StatusCode.")
    lowered = message.lower()
    if "maximum queue size" in lowered or status == "RESOURCE_EXHAUSTED":
        return ResourceExhaustedError(
            f"Triton is overloaded: {message}", retry_after_ms=retry_after_ms
        )
    if status == "DEADLINE_EXCEEDED" or "request timeout expired" in lowered:
        return DeadlineExceededError(f"Triton did not answer in time: {message}")
    if status == "NOT_FOUND" or "unknown model" in lowered:
        field = "model.version" if " version " in lowered else "model.name"
        return NotFoundError(f"Triton does not serve it ({model!r}): {message}", field=field)
    if status == "INVALID_ARGUMENT":
        return InvalidArgumentError(f"Triton refused the tensors: {message}", field="inputs")
    if status in ("UNAVAILABLE", "CANCELLED", ""):
        return UnavailableError(f"Triton unreachable: {message}")
    return InternalError(f"Triton failed ({status}): {message}")


def map_triton_error(
    error: InferenceServerException, model: str, retry_after_ms: int = DEFAULT_RETRY_AFTER_MS
) -> ServiceError:
    return map_triton_failure(
        str(error.status() or ""), str(error.message() or ""), model, retry_after_ms
    )


@dataclass(frozen=True)
class TritonResult:
    version: str
    outputs: dict[str, npt.NDArray[np.generic]]


# Told the outcome of every inference call that ended (model, None on success); a
# cancelled call has no outcome.
InferObserver = Callable[[str, ServiceError | None], None]


def probe_inputs(model: TritonModel) -> tuple[dict[str, npt.NDArray[np.generic]], dict[str, str]]:
    """The smallest valid request for ``model``: one item of zeros per input."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    datatypes: dict[str, str] = {}
    for tensor in model.inputs:
        shape = [1 if dim < 0 else dim for dim in tensor.shape]
        if tensor.datatype == "BYTES":
            arrays[tensor.name] = np.full(shape, b"", dtype=np.object_)
        else:
            arrays[tensor.name] = np.zeros(shape, dtype=triton_to_np_dtype(tensor.datatype))
        datatypes[tensor.name] = tensor.datatype
    return arrays, datatypes


class TritonClient:
    """Typed calls to one Triton; every call takes a timeout, every failure is mapped."""

    def __init__(
        self,
        url: str,
        retry_after_ms: int = DEFAULT_RETRY_AFTER_MS,
        observer: InferObserver | None = None,
    ) -> None:
        self.url = url
        self._retry_after_ms = retry_after_ms
        self._observer = observer
        self._client = triton_grpc.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        # Calls whose caller was cancelled, kept referenced until Triton answers them.
        self._abandoned: set[asyncio.Future[Any]] = set()

    @property
    def abandoned_calls(self) -> int:
        """Triton calls still running after their caller was cancelled."""
        return len(self._abandoned)

    def _forget(self, call: asyncio.Future[Any]) -> None:
        self._abandoned.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved: an abandoned call's failure is nobody's error

    async def probe(self, model: TritonModel, timeout_s: float) -> ServiceError | None:
        """A tiny inference on ``model`` (zeros); None if Triton answered it. Not observed."""
        arrays, datatypes = probe_inputs(model)
        try:
            await self.infer(
                model.name,
                arrays,
                datatypes,
                request_id="hybridmesh-health-probe",
                timeout_s=timeout_s,
                headers={},
                observe=False,
            )
        except ServiceError as error:
            return error
        return None

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, models: list[str], timeout_s: float = 1.0) -> bool:
        """Triton is live and every one of ``models`` is ready."""
        return not await self.not_ready_reason(models, timeout_s)

    async def not_ready_reason(self, models: list[str], timeout_s: float = 1.0) -> str:
        """Why Triton cannot serve ``models`` ("" when it is live and all are ready)."""
        try:
            if not await self._client.is_server_live(client_timeout=timeout_s):
                return f"Triton at {self.url} is not live"
            for model in models:
                if not await self._client.is_model_ready(model, client_timeout=timeout_s):
                    return f"model {model} is not ready on Triton at {self.url}"
        except InferenceServerException as error:
            return f"Triton at {self.url} unreachable: {clip(str(error), 300)}"
        return ""

    async def model(self, name: str, timeout_s: float = 2.0) -> TritonModel:
        """The model's tensors, versions and batch limit, from Triton itself."""
        try:
            metadata = await self._client.get_model_metadata(
                name, as_json=True, client_timeout=timeout_s
            )
            config = await self._client.get_model_config(
                name, as_json=True, client_timeout=timeout_s
            )
        except InferenceServerException as error:
            raise map_triton_error(error, name, self._retry_after_ms) from error

        def tensors(entries: list[dict[str, object]]) -> tuple[TritonTensor, ...]:
            return tuple(
                TritonTensor(str(e["name"]), str(e["datatype"]), tuple(int(d) for d in e["shape"]))  # type: ignore[attr-defined]
                for e in entries
            )

        return TritonModel(
            name=name,
            versions=tuple(str(v) for v in metadata.get("versions", [])),
            inputs=tensors(metadata["inputs"]),
            outputs=tensors(metadata["outputs"]),
            max_batch_size=int(config["config"].get("max_batch_size", 0)),
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        datatypes: Mapping[str, str],
        *,
        request_id: str,
        timeout_s: float,
        headers: Mapping[str, str],
        version: str = "",
        observe: bool = True,
    ) -> TritonResult:
        """Run ``model`` (``version``: "" = the one Triton serves). Raises a ServiceError.

        The outcome goes to the observer unless ``observe`` is false (health probes)."""
        triton_inputs = []
        for name, array in inputs.items():
            tensor = triton_grpc.InferInput(name, list(array.shape), datatypes[name])
            tensor.set_data_from_numpy(array)
            triton_inputs.append(tensor)
        call = asyncio.ensure_future(
            self._client.infer(
                model,
                triton_inputs,
                model_version=version,
                request_id=request_id,
                # Triton's own per-request timeout (µs) lets it drop queued work whose
                # caller has given up; it only applies to models whose queue policy
                # allows the override (docs/cloud.md). The client deadline always does.
                timeout=max(int(timeout_s * 1e6), 1),
                client_timeout=timeout_s,
                headers=dict(headers),
            )
        )
        try:
            # Our caller's cancellation is not passed on as a gRPC cancel: Triton 2.51's
            # gRPC frontend can segfault when a cancel races the response
            # (triton-inference-server/server#7368, fixed by #7840 in r24.12; the bundled
            # server is r24.10). The call runs on to its own deadline (timeout_s, a few ms
            # of Triton's work in practice) and its answer is dropped.
            result = await asyncio.shield(call)
        except asyncio.CancelledError:
            self._abandoned.add(call)
            call.add_done_callback(self._forget)
            raise
        except InferenceServerException as error:
            failure = map_triton_error(error, model, self._retry_after_ms)
            if observe and self._observer is not None:
                self._observer(model, failure)
            raise failure from error
        if observe and self._observer is not None:
            self._observer(model, None)
        response = result.get_response()
        outputs = {output.name: result.as_numpy(output.name) for output in response.outputs}
        return TritonResult(str(response.model_version), outputs)
