"""The edge node's domain: validate a request against a local model and run it.

The gRPC servicer is a thin adapter over ``EdgeInference.infer``; this module knows
nothing about sockets, so it is tested with the real model and no server.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from google.protobuf import duration_pb2
from opentelemetry import trace

from edge_node.config import EdgeSettings
from edge_node.local_models import LoadedModel, LocalModels
from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2
from services.classification import softmax, top_k
from services.errors import InvalidArgumentError, ResourceExhaustedError
from services.tensors import decode_tensor, encode_tensor

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{0,128}$")


@dataclass(frozen=True)
class EdgeLimits:
    max_batch_size: int
    max_top_k: int
    max_payload_bytes: int


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


class EdgeInference:
    """Runs local models with bounded concurrency and a bounded wait queue."""

    def __init__(self, models: LocalModels, settings: EdgeSettings, tracer: trace.Tracer) -> None:
        self._models = models
        self._tracer = tracer
        self._limits = EdgeLimits(
            max_batch_size=settings.max_batch_size,
            max_top_k=settings.max_top_k,
            max_payload_bytes=settings.max_payload_bytes,
        )
        self._slots = asyncio.Semaphore(settings.compute_slots)
        self._max_queued = settings.max_queued_requests
        self._inline_max_us = settings.inline_compute_max_us
        self._queued = 0

    def _validate(
        self, request: edge_service_pb2.InferRequest
    ) -> tuple[LoadedModel, dict[str, npt.NDArray[np.generic]]]:
        if not REQUEST_ID_PATTERN.match(request.request_id):
            raise InvalidArgumentError(
                "at most 128 characters of [A-Za-z0-9._:-]", field="request_id"
            )
        if request.top_k > self._limits.max_top_k:
            raise InvalidArgumentError(
                f"{request.top_k} exceeds the limit of {self._limits.max_top_k}", field="top_k"
            )
        model = self._models.resolve(request.model)
        payload = sum(len(tensor.raw_contents) for tensor in request.inputs)
        if payload > self._limits.max_payload_bytes:
            raise InvalidArgumentError(
                f"payload of {payload} bytes exceeds the limit of {self._limits.max_payload_bytes}",
                field="inputs",
            )
        expected = {spec.name: spec for spec in model.inputs}
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        for index, tensor in enumerate(request.inputs):
            field = f"inputs[{index}]"
            spec = expected.get(tensor.name)
            if spec is None:
                raise InvalidArgumentError(
                    f"unknown input {tensor.name!r}; {model.name} takes {sorted(expected)}",
                    field=f"{field}.name",
                )
            if tensor.name in arrays:
                raise InvalidArgumentError(
                    f"input {tensor.name!r} given twice", field=f"{field}.name"
                )
            arrays[tensor.name] = decode_tensor(
                tensor,
                field,
                expected_datatype=spec.datatype,
                expected_shape=spec.shape,
                max_batch_size=min(self._limits.max_batch_size, model.max_batch_size),
            )
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise InvalidArgumentError(f"missing input(s) {missing}", field="inputs")
        batch_sizes = {array.shape[0] for array in arrays.values()}
        if len(batch_sizes) > 1:
            raise InvalidArgumentError(
                f"inputs disagree on the batch size: {sorted(batch_sizes)}", field="inputs"
            )
        return model, arrays

    async def infer(self, request: edge_service_pb2.InferRequest) -> edge_service_pb2.InferResponse:
        with self._tracer.start_as_current_span("edge.infer") as span:
            # The edge node sends nothing anywhere: its spans say so for the audit trail.
            span.set_attribute("hybridmesh.data_left_site", False)
            model, arrays = self._validate(request)
            batch = next(iter(arrays.values())).shape[0]
            span.set_attribute("hybridmesh.model.name", model.name)
            span.set_attribute("hybridmesh.model.version", model.version)
            span.set_attribute("hybridmesh.batch_size", batch)
            if request.request_id:
                span.set_attribute("hybridmesh.request_id", request.request_id)

            if self._slots.locked() and self._queued >= self._max_queued:
                raise ResourceExhaustedError(
                    f"{self._queued} requests already wait for a compute slot",
                    retry_after_ms=50,
                )
            queued_at = time.perf_counter()
            self._queued += 1
            try:
                await self._slots.acquire()
            finally:
                self._queued -= 1
            try:
                started = time.perf_counter()
                if model.compute_us <= self._inline_max_us:
                    outputs = model.run(arrays)
                else:
                    # to_thread, not run_in_executor: the span and log context follow it.
                    outputs = await asyncio.to_thread(model.run, arrays)
                finished = time.perf_counter()
            finally:
                self._slots.release()

            scores = outputs[model.classification_output]
            probabilities = scores if model.outputs_probabilities else softmax(scores)
            span.set_attribute("hybridmesh.edge.compute_ms", (finished - started) * 1e3)
            span.set_attribute("hybridmesh.edge.queue_ms", (started - queued_at) * 1e3)
            return edge_service_pb2.InferResponse(
                request_id=request.request_id,
                model=model_pb2.ModelRef(name=model.name, version=model.version),
                outputs=[encode_tensor(name, value) for name, value in outputs.items()],
                classifications=top_k(probabilities, model.labels, request.top_k or 1),
                compute_time=_duration(finished - started),
                queue_time=_duration(started - queued_at),
            )

    def list_models(self) -> edge_service_pb2.ListModelsResponse:
        return edge_service_pb2.ListModelsResponse(
            models=[model.info() for model in self._models.all()]
        )
