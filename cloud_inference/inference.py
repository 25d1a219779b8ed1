"""The cloud service's domain: validate, protect Triton, call it, answer with top-k.

Most bad input is refused here against Triton's own model metadata (fetched once and
cached), so it never costs Triton anything; what Triton still refuses is mapped by
``cloud_inference.triton_client``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from google.protobuf import duration_pb2
from opentelemetry import trace

from cloud_inference.config import CloudSettings
from cloud_inference.triton_client import TritonClient, TritonModel
from hybridmesh.cloud.v1 import cloud_service_pb2
from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from services.classification import softmax, top_k
from services.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from services.telemetry import inject_trace_headers
from services.tensors import DATATYPE_BY_KSERVE_NAME, decode_tensor, encode_tensor

TIMEOUT_MARGIN_S = 0.002  # left for our own reply after Triton answers


class CloudInference:
    def __init__(
        self,
        settings: CloudSettings,
        triton: TritonClient,
        models: Mapping[str, TritonModel],
        labels: Mapping[str, Sequence[str]],
        tracer: trace.Tracer,
    ) -> None:
        self._settings = settings
        self._triton = triton
        self._models = dict(models)
        self._labels = {name: tuple(values) for name, values in labels.items()}
        self._tracer = tracer
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._queued = 0

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def _validate(
        self, request: cloud_service_pb2.InferRequest
    ) -> tuple[TritonModel, dict[str, npt.NDArray[np.generic]], dict[str, str]]:
        if request.privacy_class == routing_pb2.PRIVACY_CLASS_SENSITIVE:
            raise FailedPreconditionError(
                "SENSITIVE data must not leave the edge site", field="privacy_class"
            )
        if request.privacy_class != routing_pb2.PRIVACY_CLASS_PUBLIC and not request.anonymiser:
            raise FailedPreconditionError(
                "INTERNAL (or unspecified) data is accepted only after an anonymiser ran",
                field="anonymiser",
            )
        if request.top_k > self._settings.max_top_k:
            raise InvalidArgumentError(
                f"{request.top_k} exceeds the limit of {self._settings.max_top_k}", field="top_k"
            )
        if not request.model.name:
            raise InvalidArgumentError("required", field="model.name")
        model = self._models.get(request.model.name)
        if model is None:
            raise NotFoundError(
                f"no cloud model {request.model.name!r}; serving {self.model_names}",
                field="model.name",
            )
        if request.model.version and request.model.version not in model.versions:
            raise NotFoundError(
                f"{model.name} version {request.model.version!r} is not served "
                f"(serving {list(model.versions)})",
                field="model.version",
            )
        payload = sum(len(t.raw_contents) for t in request.inputs)
        if payload > self._settings.max_payload_bytes:
            raise InvalidArgumentError(
                f"payload of {payload} bytes exceeds {self._settings.max_payload_bytes}",
                field="inputs",
            )
        specs = {spec.name: spec for spec in model.inputs}
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        datatypes: dict[str, str] = {}
        for index, tensor in enumerate(request.inputs):
            spec = specs.get(tensor.name)
            if spec is None or tensor.name in arrays:
                raise InvalidArgumentError(
                    f"unexpected or repeated input {tensor.name!r}; {model.name} takes "
                    f"{sorted(specs)}",
                    field=f"inputs[{index}].name",
                )
            # Triton's metadata shape includes the batch dimension as -1.
            arrays[tensor.name] = decode_tensor(
                tensor,
                f"inputs[{index}]",
                expected_datatype=DATATYPE_BY_KSERVE_NAME[spec.datatype],
                expected_shape=spec.shape,
                max_batch_size=min(self._settings.max_batch_size, model.max_batch_size),
            )
            datatypes[tensor.name] = spec.datatype
        missing = sorted(set(specs) - set(arrays))
        if missing:
            raise InvalidArgumentError(f"missing input(s) {missing}", field="inputs")
        return model, arrays, datatypes

    async def infer(
        self, request: cloud_service_pb2.InferRequest, time_remaining_s: float | None
    ) -> cloud_service_pb2.InferResponse:
        started = time.perf_counter()
        with self._tracer.start_as_current_span("cloud.triton_infer") as span:
            model, arrays, datatypes = self._validate(request)
            batch = next(iter(arrays.values())).shape[0]
            span.set_attribute("hybridmesh.model.name", model.name)
            span.set_attribute("hybridmesh.batch_size", int(batch))
            span.set_attribute("hybridmesh.request_id", request.request_id)
            if self._slots.locked() and self._queued >= self._settings.max_queued_requests:
                raise ResourceExhaustedError(
                    f"{self._queued} requests already wait for Triton", retry_after_ms=20
                )
            self._queued += 1
            try:
                await self._slots.acquire()
            finally:
                self._queued -= 1
            try:
                remaining = (
                    time_remaining_s
                    if time_remaining_s is not None
                    else self._settings.default_timeout_s
                ) - (time.perf_counter() - started)
                version, outputs = await self._triton.infer(
                    model.name,
                    arrays,
                    datatypes,
                    request_id=request.request_id,
                    timeout_s=max(remaining - TIMEOUT_MARGIN_S, 0.001),
                    # Triton's aio client takes no interceptor: W3C context as headers.
                    headers=inject_trace_headers(level1_flags=True),
                )
            finally:
                self._slots.release()
            span.set_attribute("hybridmesh.model.version", version)
            scores = outputs[model.outputs[0].name].astype(np.float32)
            labels = self._labels.get(model.name, ())
            elapsed = time.perf_counter() - started
            compute = duration_pb2.Duration()
            compute.FromNanoseconds(int(elapsed * 1e9))
            return cloud_service_pb2.InferResponse(
                request_id=request.request_id,
                model=model_pb2.ModelRef(name=model.name, version=version),
                outputs=[encode_tensor(name, value) for name, value in outputs.items()],
                classifications=top_k(softmax(scores), labels, request.top_k or 1),
                compute_time=compute,
            )

    def list_models(self, ready: bool) -> cloud_service_pb2.ListModelsResponse:
        return cloud_service_pb2.ListModelsResponse(
            models=[
                model_pb2.ModelInfo(
                    model=model_pb2.ModelRef(
                        name=m.name, version=m.versions[-1] if m.versions else ""
                    ),
                    inputs=[_spec(t.name, t.datatype, t.shape) for t in m.inputs],
                    outputs=[_spec(t.name, t.datatype, t.shape) for t in m.outputs],
                    labels=self._labels.get(m.name, ()),
                    max_batch_size=m.max_batch_size,
                    ready=ready,
                )
                for m in self._models.values()
            ]
        )


def _spec(name: str, datatype: str, shape: tuple[int, ...]) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=name, datatype=DATATYPE_BY_KSERVE_NAME[datatype], shape=shape)
