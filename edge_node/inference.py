"""The edge node's domain: validate a request against a local model and run it.

The gRPC servicer is a thin adapter over ``EdgeInference.infer``; this module knows
nothing about sockets, so it is tested with the real model and no server.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from google.protobuf import duration_pb2
from opentelemetry import metrics, trace

from edge_node.config import EdgeSettings
from edge_node.local_models import LoadedModel, LocalModels
from hybridmesh.common.v1 import model_pb2
from hybridmesh.edge.v1 import edge_service_pb2
from services import attributes
from services.admission import Admission
from services.classification import softmax, top_k
from services.errors import InvalidArgumentError
from services.request_ids import check_request_id
from services.tensors import InputSpec, decode_inputs, encode_tensor
from services.views import UnknownViewError, apply_view, view_output_name

# gRFC A6 pushback when every compute slot is busy and the wait queue is full.
RETRY_AFTER_MS = 50


@dataclass(frozen=True)
class EdgeLimits:
    max_batch_size: int
    max_top_k: int
    max_payload_bytes: int


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def run_with_views(
    model: LoadedModel, arrays: dict[str, npt.NDArray[np.generic]], views: tuple[str, ...]
) -> dict[str, npt.NDArray[np.float32]]:
    """The model's outputs, plus ``<classification output>_view_<view>`` for each
    requested test-time view (the model run once more on the transformed input)."""
    outputs = model.run(arrays)
    for view in views:
        seen = model.run({name: apply_view(view, value) for name, value in arrays.items()})
        name = view_output_name(model.classification_output, view)
        outputs[name] = seen[model.classification_output]
    return outputs


class EdgeInference:
    """Runs local models with bounded concurrency and a bounded wait queue."""

    def __init__(
        self,
        models: LocalModels,
        settings: EdgeSettings,
        tracer: trace.Tracer,
        latency: metrics.Histogram | None = None,
    ) -> None:
        """``latency``: records each model run's compute time in seconds, by model and
        version (``hybridmesh.edge.inference.duration``)."""
        self._models = models
        self._tracer = tracer
        self._latency = latency
        self._limits = EdgeLimits(
            max_batch_size=settings.max_batch_size,
            max_top_k=settings.max_top_k,
            max_payload_bytes=settings.max_payload_bytes,
        )
        self.admission = Admission(
            settings.compute_slots,
            settings.max_queued_requests,
            RETRY_AFTER_MS,
            resource="the model",
        )
        self._inline_max_us = settings.inline_compute_max_us

    def _validate(
        self, request: edge_service_pb2.InferRequest
    ) -> tuple[LoadedModel, dict[str, npt.NDArray[np.generic]]]:
        check_request_id(request.request_id)
        if request.top_k > self._limits.max_top_k:
            raise InvalidArgumentError(
                f"{request.top_k} exceeds the limit of {self._limits.max_top_k}", field="top_k"
            )
        model = self._models.resolve(request.model)
        arrays = decode_inputs(
            request.inputs,
            {spec.name: InputSpec(spec.datatype, spec.shape) for spec in model.inputs},
            model=model.name,
            max_batch_size=min(self._limits.max_batch_size, model.max_batch_size),
            max_payload_bytes=self._limits.max_payload_bytes,
        )
        for view in request.views:
            try:
                apply_view(view, next(iter(arrays.values()))[:0])
            except UnknownViewError as error:
                raise InvalidArgumentError(str(error), field="views") from error
        return model, arrays

    async def infer(self, request: edge_service_pb2.InferRequest) -> edge_service_pb2.InferResponse:
        with self._tracer.start_as_current_span("edge.infer") as span:
            # The edge node sends nothing anywhere: its spans say so for the audit trail.
            span.set_attribute(attributes.DATA_LEFT_SITE, False)
            model, arrays = self._validate(request)
            batch = next(iter(arrays.values())).shape[0]
            span.set_attribute(attributes.MODEL_NAME, model.name)
            span.set_attribute(attributes.MODEL_VERSION, model.version)
            span.set_attribute(attributes.BATCH_SIZE, batch)
            if request.request_id:
                span.set_attribute(attributes.REQUEST_ID, request.request_id)

            queued_at = time.perf_counter()
            # No wait budget: the caller's deadline cancels a request that waits too long.
            async with self.admission.slot():
                started = time.perf_counter()
                views = tuple(request.views)
                if model.compute_us * (1 + len(views)) <= self._inline_max_us:
                    outputs = run_with_views(model, arrays, views)
                else:
                    # to_thread, not run_in_executor: the span and log context follow it.
                    outputs = await asyncio.to_thread(run_with_views, model, arrays, views)
                finished = time.perf_counter()

            scores = outputs[model.classification_output]
            probabilities = scores if model.outputs_probabilities else softmax(scores)
            span.set_attribute(attributes.EDGE_COMPUTE_MS, (finished - started) * 1e3)
            if self._latency is not None:
                self._latency.record(
                    finished - started, {"model": model.name, "version": model.version}
                )
            span.set_attribute(attributes.EDGE_QUEUE_MS, (started - queued_at) * 1e3)
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
