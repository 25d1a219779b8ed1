"""The cloud service's domain: validate, protect Triton, call it, answer with top-k.

Most bad input is refused here against Triton's own model metadata (fetched once and
cached), so it never costs Triton anything; what Triton still refuses is mapped by
``cloud_inference.triton_client``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from google.protobuf import duration_pb2
from opentelemetry import metrics, trace

from cloud_inference.admission import Admission
from cloud_inference.config import CloudSettings
from cloud_inference.dedupe import AnswerCache, payload_sha256
from cloud_inference.intake import IntakeLog
from cloud_inference.labels import ModelFacts
from cloud_inference.triton_client import TritonClient, TritonModel
from hybridmesh.cloud.v1 import cloud_service_pb2
from hybridmesh.common.v1 import model_pb2, routing_pb2, tensor_pb2
from services import attributes
from services.classification import softmax, top_k
from services.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    clip,
)
from services.privacy import ANONYMISER_NAMES
from services.request_ids import check_request_id
from services.telemetry import inject_trace_headers
from services.tensors import DATATYPE_BY_KSERVE_NAME, InputSpec, decode_inputs, encode_tensor
from services.validation import check_enum, enum_name

TIMEOUT_MARGIN_S = 0.002  # left for our own reply after Triton answers


@dataclass(frozen=True)
class ValidRequest:
    model: TritonModel
    arrays: dict[str, npt.NDArray[np.generic]]
    datatypes: dict[str, str]  # KServe names, per input

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])


def check_privacy(request: cloud_service_pb2.InferRequest) -> None:
    """Defence in depth: the router never sends these, and the cloud never accepts them."""
    check_enum(request.privacy_class, routing_pb2.PrivacyClass.DESCRIPTOR, "privacy_class")
    if request.privacy_class == routing_pb2.PRIVACY_CLASS_SENSITIVE:
        raise FailedPreconditionError(
            "SENSITIVE data must not leave the edge site", field="privacy_class"
        )
    # UNSPECIFIED counts as INTERNAL (docs/architecture.md): it may leave only anonymised.
    if request.privacy_class != routing_pb2.PRIVACY_CLASS_PUBLIC and not request.anonymiser:
        raise FailedPreconditionError(
            "INTERNAL (or unspecified) data is accepted only after an anonymiser ran",
            field="anonymiser",
        )
    if request.anonymiser and request.anonymiser not in ANONYMISER_NAMES:
        # An anonymiser the edge does not have cannot have run there.
        raise InvalidArgumentError(
            f"unknown anonymiser {clip(request.anonymiser)!r}; known: {sorted(ANONYMISER_NAMES)}",
            field="anonymiser",
        )


class CloudInference:
    def __init__(
        self,
        settings: CloudSettings,
        triton: TritonClient,
        models: Mapping[str, TritonModel],
        facts: Mapping[str, ModelFacts],
        tracer: trace.Tracer,
        *,
        admission: Admission | None = None,
        answers: AnswerCache | None = None,
        intake: IntakeLog | None = None,
        latency: metrics.Histogram | None = None,
    ) -> None:
        """``latency``: records each Triton call's time in seconds, by model and version
        (``hybridmesh.cloud.inference.duration``)."""
        self._settings = settings
        self._latency = latency
        self._triton = triton
        self._models = dict(models)
        self._facts = dict(facts)
        self._tracer = tracer
        self._admission = admission or Admission(
            settings.max_in_flight, settings.max_queued_requests, settings.retry_after_ms
        )
        self._answers = answers or AnswerCache(settings.answer_cache_size)
        self._intake = intake

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def validate(self, request: cloud_service_pb2.InferRequest) -> ValidRequest:
        """Everything Triton would refuse, refused here first, naming the field."""
        check_request_id(request.request_id)
        check_privacy(request)
        if request.top_k > self._settings.max_top_k:
            raise InvalidArgumentError(
                f"{request.top_k} exceeds the limit of {self._settings.max_top_k}", field="top_k"
            )
        if not request.model.name:
            raise InvalidArgumentError("required", field="model.name")
        model = self._models.get(request.model.name)
        if model is None:
            raise NotFoundError(
                f"no cloud model {clip(request.model.name)!r}; serving {self.model_names}",
                field="model.name",
            )
        if request.model.version and request.model.version not in model.versions:
            raise NotFoundError(
                f"{model.name} version {clip(request.model.version)!r} is not served "
                f"(serving {list(model.versions)})",
                field="model.version",
            )
        arrays = decode_inputs(
            request.inputs,
            {
                spec.name: InputSpec(DATATYPE_BY_KSERVE_NAME[spec.datatype], spec.shape)
                for spec in model.inputs
            },
            model=model.name,
            # Triton's metadata shape includes the batch dimension as -1.
            max_batch_size=min(self._settings.max_batch_size, model.max_batch_size),
            max_payload_bytes=self._settings.max_payload_bytes,
        )
        datatypes = {spec.name: spec.datatype for spec in model.inputs}
        return ValidRequest(model, arrays, datatypes)

    async def infer(
        self, request: cloud_service_pb2.InferRequest, time_remaining_s: float | None
    ) -> cloud_service_pb2.InferResponse:
        started = time.perf_counter()
        budget_s = (
            self._settings.default_timeout_s if time_remaining_s is None else time_remaining_s
        )

        def remaining_s() -> float:
            return budget_s - (time.perf_counter() - started)

        with self._tracer.start_as_current_span("cloud.triton_infer") as span:
            span.set_attribute(attributes.REQUEST_ID, request.request_id)
            # This span runs off site: whatever it holds left the edge.
            span.set_attribute(attributes.DATA_LEFT_SITE, True)
            span.set_attribute(
                attributes.PRIVACY_CLASS,
                enum_name(routing_pb2.PrivacyClass.DESCRIPTOR, request.privacy_class),
            )
            if self._intake is not None:
                self._intake.record(request)
            valid = self.validate(request)
            model = valid.model
            payload = payload_sha256(request)
            if request.reconciliation:
                answered = self._answers.get(request.request_id, payload)
                span.set_attribute(attributes.DEDUPLICATED, answered is not None)
                if answered is not None:
                    return answered
            span.set_attribute(attributes.MODEL_NAME, model.name)
            span.set_attribute(attributes.BATCH_SIZE, valid.batch_size)
            async with self._admission.slot(remaining_s() - TIMEOUT_MARGIN_S):
                timeout_s = remaining_s() - TIMEOUT_MARGIN_S
                if timeout_s <= 0:
                    raise DeadlineExceededError("no time left to call Triton")
                called = time.perf_counter()
                result = await self._triton.infer(
                    model.name,
                    valid.arrays,
                    valid.datatypes,
                    version=request.model.version,
                    request_id=request.request_id,
                    timeout_s=timeout_s,
                    # Triton's aio client takes no interceptor: W3C context as headers.
                    headers=inject_trace_headers(level1_flags=True),
                )
                triton_s = time.perf_counter() - called
            if self._latency is not None:
                self._latency.record(triton_s, {"model": model.name, "version": result.version})
            span.set_attribute(attributes.MODEL_VERSION, result.version)
            span.set_attribute(attributes.TRITON_LATENCY_MS, round(triton_s * 1e3, 3))
            output = model.outputs[0].name
            facts = self._facts.get(model.name, ModelFacts())
            probabilities = softmax(np.asarray(result.outputs[output], dtype=np.float32))
            compute = duration_pb2.Duration()
            compute.FromNanoseconds(int((time.perf_counter() - started) * 1e9))
            response = cloud_service_pb2.InferResponse(
                request_id=request.request_id,
                model=model_pb2.ModelRef(name=model.name, version=result.version),
                outputs=[encode_tensor(name, value) for name, value in result.outputs.items()],
                classifications=top_k(probabilities, facts.labels, request.top_k or 1),
                compute_time=compute,
            )
            self._answers.put(request.request_id, payload, response)
            return response

    def list_models(self, ready: bool) -> cloud_service_pb2.ListModelsResponse:
        return cloud_service_pb2.ListModelsResponse(
            models=[
                model_pb2.ModelInfo(
                    model=model_pb2.ModelRef(name=m.name, version=m.served_version),
                    inputs=[_spec(t.name, t.datatype, t.shape) for t in m.inputs],
                    outputs=[_spec(t.name, t.datatype, t.shape) for t in m.outputs],
                    labels=self._facts.get(m.name, ModelFacts()).labels,
                    sha256=self._facts.get(m.name, ModelFacts()).sha256,
                    max_batch_size=m.max_batch_size,
                    ready=ready,
                )
                for m in self._models.values()
            ]
        )


def _spec(name: str, datatype: str, shape: tuple[int, ...]) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=name, datatype=DATATYPE_BY_KSERVE_NAME[datatype], shape=shape)
