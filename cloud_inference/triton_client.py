"""A small typed facade over tritonclient.grpc.aio, with Triton's errors mapped to ours.

One InferenceServerClient per process. tritonclient has no type stubs; everything it
returns is converted here so the rest of the service stays typed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException

from services.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
)

RETRY_AFTER_MS = 50


@dataclass(frozen=True)
class TritonTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TritonModel:
    name: str
    versions: tuple[str, ...]
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    max_batch_size: int


def map_triton_error(error: InferenceServerException, model: str) -> ServiceError:
    """Triton's failure -> the status our callers should see."""
    status = str(error.status() or "")
    message = str(error.message() or "")
    lowered = message.lower()
    if "queue" in lowered and ("exceed" in lowered or "full" in lowered):
        return ResourceExhaustedError(
            f"Triton is overloaded: {message}", retry_after_ms=RETRY_AFTER_MS
        )
    if status.endswith("RESOURCE_EXHAUSTED"):
        return ResourceExhaustedError(f"Triton: {message}", retry_after_ms=RETRY_AFTER_MS)
    if status.endswith("DEADLINE_EXCEEDED") or "deadline" in lowered or "timeout" in lowered:
        return DeadlineExceededError(f"Triton did not answer in time: {message}")
    if status.endswith("NOT_FOUND") or "unknown model" in lowered:
        return NotFoundError(f"Triton does not serve {model!r}: {message}", field="model.name")
    if status.endswith("INVALID_ARGUMENT"):
        return InvalidArgumentError(f"Triton refused the tensors: {message}", field="inputs")
    if status.endswith(("UNAVAILABLE", "CANCELLED")) or not status:
        return UnavailableError(f"Triton unreachable: {message}")
    return InternalError(f"Triton failed ({status}): {message}")


class TritonClient:
    def __init__(self, url: str) -> None:
        self._client = triton_grpc.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self, models: list[str], timeout_s: float = 1.0) -> bool:
        try:
            if not await self._client.is_server_live(client_timeout=timeout_s):
                return False
            for model in models:
                if not await self._client.is_model_ready(model, client_timeout=timeout_s):
                    return False
        except InferenceServerException:
            return False
        return True

    async def model(self, name: str, timeout_s: float = 2.0) -> TritonModel:
        try:
            metadata = await self._client.get_model_metadata(
                name, as_json=True, client_timeout=timeout_s
            )
            config = await self._client.get_model_config(
                name, as_json=True, client_timeout=timeout_s
            )
        except InferenceServerException as error:
            raise map_triton_error(error, name) from error

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
    ) -> tuple[str, dict[str, npt.NDArray[np.generic]]]:
        """Run ``model``; returns (model version, outputs). Raises a mapped ServiceError."""
        triton_inputs = []
        for name, array in inputs.items():
            tensor = triton_grpc.InferInput(name, list(array.shape), datatypes[name])
            tensor.set_data_from_numpy(array)
            triton_inputs.append(tensor)
        try:
            result = await self._client.infer(
                model,
                triton_inputs,
                request_id=request_id,
                # Triton's own per-request timeout (µs) bounds its queueing too.
                timeout=max(int(timeout_s * 1e6), 1),
                client_timeout=timeout_s,
                headers=dict(headers),
            )
        except InferenceServerException as error:
            raise map_triton_error(error, model) from error
        response = result.get_response()
        outputs = {output.name: result.as_numpy(output.name) for output in response.outputs}
        return str(response.model_version), outputs
