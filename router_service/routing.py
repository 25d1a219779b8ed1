"""The router's domain: one request in, one explained answer out.

Order of work: validate, budget, hard policy, edge inference, learned escalation score,
cloud escalation for the items that earn it, fallback both ways, explanation. No
sockets here beyond the two tier clients, which tests can point at real servers.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from google.protobuf import duration_pb2
from opentelemetry import trace

from hybridmesh.common.v1 import decision_pb2, model_pb2, routing_pb2, tensor_pb2
from hybridmesh.router.v1 import router_service_pb2
from router_service.breaker import BreakerState
from router_service.config import RouterSettings
from router_service.escalation import EscalationClassifier
from router_service.features import router_features
from router_service.metrics import RouterMetrics
from router_service.outbox import OutboxItem, Priority
from router_service.policy import (
    PolicyVerdict,
    Reason,
    RequestConstraints,
    Situation,
    evaluate,
)
from router_service.reconciler import Reconciler, sampled
from router_service.tiers import CloudTier, EdgeTier, TierAnswer, TierUnavailableError
from services.classification import softmax
from services.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from services.tensors import DATATYPE_TO_NUMPY, DataTypeValue, decode_tensor, encode_tensor

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{0,128}$")
# The caller's rules that take the cloud off the table for every item.
CALLER_EXCLUDED_CLOUD = frozenset(
    {
        decision_pb2.DECISION_REASON_PRIVACY_SENSITIVE,
        decision_pb2.DECISION_REASON_PREFERENCE_EDGE_ONLY,
    }
)
# Reasons that are the caller's own choice: keeping the edge answer is not a degradation.
CALLER_CHOSEN = frozenset(
    {
        decision_pb2.DECISION_REASON_PRIVACY_SENSITIVE,
        decision_pb2.DECISION_REASON_PREFERENCE_EDGE_ONLY,
        decision_pb2.DECISION_REASON_COST_CEILING,
    }
)
# The cloud should have answered these items but could not: queue them for the cloud.
CLOUD_UNREACHABLE = frozenset(
    {
        decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN,
        decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK,
    }
)
# Why data went to the cloud, for the audit log.
TRANSFER_PURPOSE = {
    decision_pb2.DECISION_REASON_PREFERENCE_CLOUD_ONLY: "cloud-only",
    decision_pb2.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK: "edge-fallback",
}
EDGE, CLOUD = routing_pb2.TIER_EDGE, routing_pb2.TIER_CLOUD


@dataclass(frozen=True)
class PairSpec:
    """A model pair as the router needs it: names, input contract, labels."""

    name: str
    edge_model: str
    cloud_model: str
    input_name: str
    input_datatype: DataTypeValue
    input_shape: tuple[int, ...]
    # True when the models output probabilities rather than logits.
    outputs_probabilities: bool = False
    # What runs on INTERNAL data before it leaves the site.
    anonymiser: str = "strip-attributes"


@dataclass
class _Item:
    tier: routing_pb2.Tier.ValueType = EDGE
    reason: Reason = decision_pb2.DECISION_REASON_EDGE_CONFIDENT
    score: float = 0.0


@dataclass
class _Outcome:
    """One request in flight: what was asked, what the policy allows, what happened."""

    request: router_service_pb2.InferRequest
    request_id: str
    pair: PairSpec
    inputs: npt.NDArray[np.generic]
    constraints: RequestConstraints
    verdict: PolicyVerdict
    deadline: float
    items: list[_Item]
    # The policy this request started with: an over-the-air swap mid-request does not
    # mix one version's threshold with another's scores.
    classifier: EscalationClassifier
    edge: TierAnswer | None = None
    cloud: TierAnswer | None = None
    # Item index -> row of ``cloud`` holding that item's cloud answer.
    cloud_rows: dict[int, int] = field(default_factory=dict)
    hedge: asyncio.Task[TierAnswer] | None = None
    # Items whose data was sent to the cloud (what the cloud bills), answered or not.
    cloud_items_sent: int = 0
    degraded: bool = False
    data_left_site: bool = False
    # CLOUD_ONLY was asked for, but the cloud failed: every edge-served item is queued.
    cloud_only_failed: bool = False
    queued: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    explanation: str = ""

    @property
    def anonymiser(self) -> str:
        return self.pair.anonymiser if self.constraints.requires_anonymiser else ""

    @property
    def threshold(self) -> float:
        return self.classifier.threshold

    @property
    def policy_version(self) -> str:
        return self.classifier.version


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


class Router:
    def __init__(
        self,
        settings: RouterSettings,
        *,
        pairs: Sequence[PairSpec],
        edge: EdgeTier,
        cloud: CloudTier,
        classifier: EscalationClassifier,
        tracer: trace.Tracer,
        metrics: RouterMetrics | None = None,
        reconciler: Reconciler | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._reconciler = reconciler
        self._pairs = {pair.name: pair for pair in pairs}
        self.edge = edge
        self.cloud = cloud
        self.classifier = classifier
        self._tracer = tracer
        self._metrics = metrics
        self._clock = clock

    @property
    def pair_names(self) -> list[str]:
        return sorted(self._pairs)

    async def infer(
        self, request: router_service_pb2.InferRequest, time_remaining_s: float | None
    ) -> router_service_pb2.InferResponse:
        final: router_service_pb2.InferResponse | None = None
        async for response, _ in self.stages(request, time_remaining_s, progressive=False):
            final = response
        assert final is not None
        return final

    async def stages(
        self,
        request: router_service_pb2.InferRequest,
        time_remaining_s: float | None,
        *,
        progressive: bool,
    ) -> AsyncIterator[tuple[router_service_pb2.InferResponse, bool]]:
        """Yield (answer, is_final); with ``progressive`` the edge answer comes first."""
        started = self._clock()
        outcome: _Outcome | None = None
        with self._tracer.start_as_current_span("router.decide") as span:
            try:
                outcome = self._begin(request, time_remaining_s, started, span)
                if outcome.verdict.cloud_first and await self._cloud_first(outcome):
                    yield self._finish(outcome, started, span), True
                    return
                self._maybe_hedge(outcome)
                if not await self._edge_or_cloud_fallback(outcome):
                    yield self._finish(outcome, started, span), True  # the cloud answered
                    return
                escalate = self._plan_escalation(outcome)
                if not escalate:
                    self._cancel_hedge(outcome)
                    await self._queue_for_reconciliation(outcome)
                    yield self._finish(outcome, started, span), True
                    return
                if progressive:
                    yield self._finish(outcome, started, span, partial=True), False
                await self._escalate(outcome, escalate)
                await self._queue_for_reconciliation(outcome)
                yield self._finish(outcome, started, span), True
            finally:
                if outcome is not None:
                    self._cancel_hedge(outcome)

    def _begin(
        self,
        request: router_service_pb2.InferRequest,
        time_remaining_s: float | None,
        started: float,
        span: trace.Span,
    ) -> _Outcome:
        """Validate, set the budget, apply hard policy."""
        pair, inputs, constraints = self._validate(request)
        deadline = started + self._budget(request, time_remaining_s)
        batch = inputs.shape[0]
        verdict = evaluate(
            constraints,
            Situation(
                remaining_budget_s=deadline - self._clock(),
                cloud_p95_s=self.cloud.latency.p95,
                cloud_breaker_open=self.cloud.breaker.state is BreakerState.OPEN,
                cloud_cost_micros=self._settings.cloud_price_micros * batch,
            ),
        )
        outcome = _Outcome(
            request=request,
            request_id=request.request_id or uuid.uuid4().hex,
            pair=pair,
            inputs=inputs,
            constraints=constraints,
            verdict=verdict,
            deadline=deadline,
            items=[_Item() for _ in range(batch)],
            classifier=self.classifier,
        )
        outcome.timings["policy"] = self._clock() - started
        span.set_attribute("hybridmesh.request_id", outcome.request_id)
        span.set_attribute("hybridmesh.pair", pair.name)
        span.set_attribute("hybridmesh.batch_size", batch)
        # Until something is sent: a request that fails still says nothing left.
        span.set_attribute("hybridmesh.data_left_site", False)
        return outcome

    async def _cloud_first(self, outcome: _Outcome) -> bool:
        """CLOUD_ONLY: True when the cloud answered; else the edge answers, degraded."""
        try:
            await self._call_cloud(
                outcome,
                list(range(len(outcome.items))),
                decision_pb2.DECISION_REASON_PREFERENCE_CLOUD_ONLY,
            )
        except TierUnavailableError as error:
            outcome.degraded = True
            outcome.cloud_only_failed = True
            outcome.explanation = f"CLOUD_ONLY requested but the cloud failed ({error}); "
            return False
        outcome.explanation = "CLOUD_ONLY requested; the cloud answered"
        return True

    async def _edge_or_cloud_fallback(self, outcome: _Outcome) -> bool:
        """Run the edge. False when the edge failed and the cloud answered instead."""
        try:
            outcome.edge = await self.edge.infer(
                request_id=outcome.request_id,
                model=outcome.pair.edge_model,
                inputs=outcome.request.inputs,
                top_k=outcome.request.top_k or 1,
                timeout_s=self._timeout(outcome.deadline),
            )
        except TierUnavailableError as edge_error:
            await self._cloud_after_edge_failure(outcome, edge_error)
            return False
        outcome.timings["edge"] = outcome.edge.elapsed_s
        return True

    async def _cloud_after_edge_failure(
        self, outcome: _Outcome, edge_error: TierUnavailableError
    ) -> None:
        edge_detail = edge_error.detail or str(edge_error.code)
        blocked = outcome.verdict.cloud_blocked_reason
        if blocked is not None or outcome.degraded:
            why = (
                decision_pb2.DecisionReason.Name(blocked)
                if blocked is not None
                else "it failed too"
            )
            raise UnavailableError(
                f"edge node unavailable ({edge_detail}) and the cloud may not serve: {why}"
            ) from edge_error
        try:
            everything = list(range(len(outcome.items)))
            reason = decision_pb2.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK
            if outcome.hedge is not None:
                self._adopt_cloud(outcome, await outcome.hedge, {i: i for i in everything}, reason)
            else:
                await self._call_cloud(outcome, everything, reason)
        except TierUnavailableError as cloud_error:
            raise UnavailableError(
                f"no tier could answer: edge: {edge_detail}; cloud: {cloud_error.detail}"
            ) from cloud_error
        outcome.degraded = True
        outcome.explanation = f"edge node failed ({edge_detail}); the cloud answered"

    def _plan_escalation(self, outcome: _Outcome) -> list[int]:
        """Score every item; return the items the cloud should serve."""
        assert outcome.edge is not None
        started = self._clock()
        probabilities = self._probabilities(outcome.pair, outcome.edge)
        scores = outcome.classifier.score(router_features(probabilities, outcome.inputs))
        outcome.timings["classifier"] = self._clock() - started
        wanted = self._wanted_escalations(scores, probabilities, outcome)
        blocked = outcome.verdict.cloud_blocked_reason
        if blocked in CALLER_EXCLUDED_CLOUD:
            # The cloud was never an option: every item is explained by the caller's rule.
            for item in outcome.items:
                item.reason = blocked
        elif blocked is not None:
            for index in wanted:
                outcome.items[index].reason = blocked
            outcome.degraded |= bool(wanted) and blocked not in CALLER_CHOSEN
        escalate = wanted if blocked is None else []
        outcome.explanation += self._explain(outcome, scores, escalate, blocked, wanted)
        return escalate

    def _maybe_hedge(self, outcome: _Outcome) -> None:
        """Start the cloud call now, beside the edge, when there is no time to do them in
        turn: the remaining budget is below the hedge budget, or below edge p95 + cloud
        p95. If the edge answer turns out confident, the cloud call is cancelled."""
        if not outcome.verdict.cloud_allowed:
            return
        remaining = outcome.deadline - self._clock()
        edge_p95, cloud_p95 = self.edge.latency.p95, self.cloud.latency.p95
        sequential_too_slow = (
            edge_p95 is not None and cloud_p95 is not None and remaining < edge_p95 + cloud_p95
        )
        if remaining >= self._settings.hedge_below_budget_s and not sequential_too_slow:
            return
        outcome.hedge = asyncio.create_task(
            self.cloud.infer(
                request_id=outcome.request_id,
                model=outcome.pair.cloud_model,
                inputs=outcome.request.inputs,
                top_k=outcome.request.top_k or 1,
                timeout_s=self._cloud_timeout(outcome.deadline),
                privacy_class=outcome.constraints.privacy_class,
                anonymiser=outcome.anonymiser,
                purpose="hedge",
            )
        )
        # The request is on the wire from here on, whatever happens to the call.
        outcome.data_left_site = True
        outcome.cloud_items_sent = len(outcome.items)
        outcome.explanation = "hedged: cloud called beside the edge (tight deadline); "

    @staticmethod
    def _cancel_hedge(outcome: _Outcome) -> None:
        hedge = outcome.hedge
        if hedge is None:
            return
        if not hedge.done():
            hedge.cancel()  # the edge answer won: the loser is cancelled
            outcome.explanation += "; hedged cloud call cancelled"
        elif not hedge.cancelled():
            hedge.exception()  # retrieved, so a failed loser is not reported as lost

    async def _escalate(self, outcome: _Outcome, escalate: list[int]) -> None:
        try:
            if outcome.hedge is not None:
                answer = await outcome.hedge
                self._adopt_cloud(outcome, answer, {i: i for i in escalate}, None)
            else:
                await self._call_cloud(outcome, escalate, None)
        except TierUnavailableError as error:
            for index in escalate:
                outcome.items[index].reason = (
                    decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN
                    if error.code is None
                    else decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK
                )
            outcome.degraded = True
            outcome.explanation += f"; the cloud failed ({error}), edge answer kept"

    async def _queue_for_reconciliation(self, outcome: _Outcome) -> None:
        """Store the items the cloud should have answered (or a sample of confident
        ones) in the outbox, so the cloud checks them once it is back."""
        if self._reconciler is None or outcome.edge is None:
            return
        if outcome.constraints.privacy_class == routing_pb2.PRIVACY_CLASS_SENSITIVE:
            return  # never leaves the site, so never queued either
        items = outcome.items
        # CLOUD_ONLY wanted every item from the cloud: all of them are owed a cloud answer.
        wanted_all = outcome.cloud_only_failed or (
            outcome.constraints.preference == routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY
            and outcome.verdict.cloud_blocked_reason in CLOUD_UNREACHABLE
        )
        indices = [
            index
            for index, item in enumerate(items)
            if item.tier == EDGE and (wanted_all or item.reason in CLOUD_UNREACHABLE)
        ]
        priority = Priority.ESCALATION
        if not indices:
            confident = all(i.reason == decision_pb2.DECISION_REASON_EDGE_CONFIDENT for i in items)
            if not confident or not sampled(outcome.request_id, self._settings.outbox_sample_rate):
                return
            indices, priority = list(range(len(items))), Priority.SAMPLE
        source = outcome.request.inputs[0]
        edge = outcome.edge
        outcome.queued = await self._reconciler.enqueue(
            OutboxItem(
                request_id=outcome.request_id,
                priority=priority,
                pair=outcome.pair.name,
                privacy_class=outcome.constraints.privacy_class,
                top_k=outcome.request.top_k or 1,
                item_indices=tuple(indices),
                edge_classes=tuple(edge.classifications[i].top_k[0].class_index for i in indices),
                edge_model=f"{edge.model.name}:{edge.model.version}",
                inputs=encode_tensor(
                    source.name, np.ascontiguousarray(outcome.inputs[indices])
                ).SerializeToString(),
            )
        )
        if outcome.queued and priority is Priority.ESCALATION:
            outcome.explanation += f"; {len(indices)} item(s) queued for reconciliation"

    # -- steps -------------------------------------------------------------------------

    def _validate(
        self, request: router_service_pb2.InferRequest
    ) -> tuple[PairSpec, npt.NDArray[np.generic], RequestConstraints]:
        if not REQUEST_ID_PATTERN.match(request.request_id):
            raise InvalidArgumentError(
                "at most 128 characters of [A-Za-z0-9._:-]", field="request_id"
            )
        if not request.model:
            raise InvalidArgumentError("required: a model pair name", field="model")
        pair = self._pairs.get(request.model)
        if pair is None:
            raise NotFoundError(
                f"no model pair {request.model!r}; known: {sorted(self._pairs)}", field="model"
            )
        if request.top_k > self._settings.max_top_k:
            raise InvalidArgumentError(
                f"{request.top_k} exceeds the limit of {self._settings.max_top_k}", field="top_k"
            )
        if len(request.inputs) != 1:
            raise InvalidArgumentError(
                f"expected exactly one input tensor {pair.input_name!r}, got {len(request.inputs)}",
                field="inputs",
            )
        if request.inputs[0].name != pair.input_name:
            raise InvalidArgumentError(
                f"expected input {pair.input_name!r}, got {request.inputs[0].name!r}",
                field="inputs[0].name",
            )
        inputs = decode_tensor(
            request.inputs[0],
            "inputs[0]",
            expected_datatype=pair.input_datatype,
            expected_shape=pair.input_shape,
            max_batch_size=self._settings.max_batch_size,
        )
        return pair, inputs, RequestConstraints.from_hints(request.hints)

    def _budget(
        self, request: router_service_pb2.InferRequest, time_remaining_s: float | None
    ) -> float:
        """Seconds this request may take: the gRPC deadline wins, then hints, then default."""
        if time_remaining_s is not None:
            budget = time_remaining_s
        elif request.hints.HasField("budget"):
            budget = request.hints.budget.ToTimedelta().total_seconds()
        else:
            budget = self._settings.default_budget_s
        budget -= self._settings.budget_margin_s
        if budget <= 0:
            raise DeadlineExceededError("no time left to route this request")
        return budget

    def _timeout(self, deadline: float) -> float:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise DeadlineExceededError("the deadline passed while routing")
        return remaining

    def _cloud_timeout(self, deadline: float) -> float:
        """The cloud call ends early enough that a failure still leaves time to store the
        item in the outbox and answer with the edge's result within the deadline."""
        remaining = self._timeout(deadline)
        return max(remaining - self._settings.outbox_write_reserve_s, remaining / 2)

    @staticmethod
    def _probabilities(pair: PairSpec, edge: TierAnswer) -> npt.NDArray[np.float32]:
        scores = _tensor_array(edge.outputs[0])
        if pair.outputs_probabilities:
            return scores.astype(np.float32)
        return softmax(scores.astype(np.float32))

    def _wanted_escalations(
        self,
        scores: npt.NDArray[np.float32],
        probabilities: npt.NDArray[np.float32],
        outcome: _Outcome,
    ) -> list[int]:
        wanted = []
        top1 = probabilities.max(axis=1)
        max_error = outcome.constraints.max_error_probability
        for index, score in enumerate(scores):
            item = outcome.items[index]
            item.score = float(score)
            if score >= outcome.threshold:
                item.reason = decision_pb2.DECISION_REASON_ESCALATED_HARD_CASE
                wanted.append(index)
            elif max_error is not None and 1.0 - float(top1[index]) > max_error:
                item.reason = decision_pb2.DECISION_REASON_ESCALATED_QUALITY_TARGET
                wanted.append(index)
        return wanted

    async def _call_cloud(
        self, outcome: _Outcome, indices: list[int], reason: Reason | None
    ) -> None:
        """Send ``indices`` of the batch to the cloud; on success they are cloud-served."""
        source = outcome.request.inputs[0]
        subset = encode_tensor(source.name, np.ascontiguousarray(outcome.inputs[indices]))
        outcome.cloud_items_sent += len(indices)
        try:
            outcome.cloud = await self.cloud.infer(
                request_id=outcome.request_id,
                model=outcome.pair.cloud_model,
                inputs=[subset],
                top_k=outcome.request.top_k or 1,
                timeout_s=self._cloud_timeout(outcome.deadline),
                privacy_class=outcome.constraints.privacy_class,
                anonymiser=outcome.anonymiser,
                purpose=TRANSFER_PURPOSE.get(reason, "escalation") if reason else "escalation",
            )
        except TierUnavailableError as error:
            # Bytes were sent unless the breaker refused before the call.
            outcome.data_left_site |= error.code is not None
            raise
        self._adopt_cloud(
            outcome, outcome.cloud, {index: row for row, index in enumerate(indices)}, reason
        )

    @staticmethod
    def _adopt_cloud(
        outcome: _Outcome, answer: TierAnswer, rows: dict[int, int], reason: Reason | None
    ) -> None:
        """Make the cloud's answer the one for the items in ``rows``."""
        outcome.cloud = answer
        outcome.data_left_site = True
        outcome.timings["cloud"] = answer.elapsed_s
        outcome.cloud_rows = rows
        for index in rows:
            outcome.items[index].tier = CLOUD
            if reason is not None:
                outcome.items[index].reason = reason

    @staticmethod
    def _explain(
        outcome: _Outcome,
        scores: npt.NDArray[np.float32],
        escalate: list[int],
        blocked: Reason | None,
        wanted: list[int],
    ) -> str:
        text = (
            f"escalation score {float(scores.max()):.3f} vs threshold {outcome.threshold:.3f} "
            f"(policy {outcome.policy_version})"
        )
        if escalate:
            return f"{text}: escalating {len(escalate)} of {len(scores)} item(s)"
        if blocked is not None and (wanted or blocked in CALLER_EXCLUDED_CLOUD):
            return f"{text}: the cloud may not serve ({decision_pb2.DecisionReason.Name(blocked)})"
        return f"{text}: edge answer kept"

    # -- response ----------------------------------------------------------------------

    def _finish(
        self,
        outcome: _Outcome,
        started: float,
        span: trace.Span,
        *,
        partial: bool = False,
    ) -> router_service_pb2.InferResponse:
        """The response for what happened so far (``partial``: before the cloud answered)."""
        items = outcome.items
        if partial:
            items = [_Item(EDGE, item.reason, item.score) for item in items]
        cloud_rows = {} if partial else outcome.cloud_rows
        served = {item.tier for item in items}
        served_by = served.pop() if len(served) == 1 else routing_pb2.TIER_EDGE_AND_CLOUD
        reason = next((item.reason for item in items if item.tier == CLOUD), items[0].reason)
        batch = len(items)
        settings = self._settings
        edge_ran = outcome.edge is not None
        cloud_ran = outcome.cloud is not None and not partial
        timings = decision_pb2.StageTimings(total=_duration(self._clock() - started))
        for stage, seconds in outcome.timings.items():
            if stage == "cloud" and partial:
                continue
            getattr(timings, stage).CopyFrom(_duration(seconds))
        span_context = trace.get_current_span().get_span_context()
        decision = decision_pb2.Decision(
            served_by=served_by,
            reason=reason,
            explanation=outcome.explanation,
            escalation_score=max(item.score for item in items),
            threshold=outcome.threshold,
            policy_version=outcome.policy_version,
            degraded=outcome.degraded and not partial,
            data_left_site=outcome.data_left_site and not partial,
            timings=timings,
            cost=decision_pb2.Cost(
                currency_code=settings.currency_code,
                edge_micros=settings.edge_price_micros * batch if edge_ran else 0,
                cloud_micros=0
                if partial
                else settings.cloud_price_micros * outcome.cloud_items_sent,
                all_cloud_micros=settings.cloud_price_micros * batch,
            ),
            trace_id=trace.format_trace_id(span_context.trace_id) if span_context.is_valid else "",
            queued_for_reconciliation=outcome.queued and not partial,
        )
        if outcome.edge is not None:
            decision.edge_model.CopyFrom(outcome.edge.model)
        if cloud_ran and outcome.cloud is not None:
            decision.cloud_model.CopyFrom(outcome.cloud.model)
        outputs, classifications = self._merge(outcome, cloud_rows)
        if not partial:
            _annotate(span, decision)
            if self._metrics is not None:
                self._metrics.record(decision, [item.tier for item in items])
        return router_service_pb2.InferResponse(
            request_id=outcome.request_id,
            outputs=outputs,
            predictions=[
                router_service_pb2.Prediction(
                    classification=classification,
                    served_by=item.tier,
                    reason=item.reason,
                    escalation_score=item.score,
                )
                for item, classification in zip(items, classifications, strict=True)
            ],
            decision=decision,
        )

    @staticmethod
    def _merge(
        outcome: _Outcome, cloud_rows: dict[int, int]
    ) -> tuple[list[tensor_pb2.Tensor], list[model_pb2.Classification]]:
        """Edge answers with the cloud's rows put in place of the escalated items."""
        if outcome.edge is None:
            assert outcome.cloud is not None
            return list(outcome.cloud.outputs), list(outcome.cloud.classifications)
        classifications = list(outcome.edge.classifications)
        if not cloud_rows or outcome.cloud is None:
            return list(outcome.edge.outputs), classifications
        cloud_outputs = {tensor.name: tensor for tensor in outcome.cloud.outputs}
        items, rows = list(cloud_rows), list(cloud_rows.values())
        merged = []
        for tensor in outcome.edge.outputs:
            array = _tensor_array(tensor).copy()
            if tensor.name in cloud_outputs:
                array[items] = _tensor_array(cloud_outputs[tensor.name])[rows]
            merged.append(encode_tensor(tensor.name, array))
        for index, row in cloud_rows.items():
            classifications[index] = outcome.cloud.classifications[row]
        return merged, classifications


def _tensor_array(tensor: tensor_pb2.Tensor) -> npt.NDArray[np.generic]:
    dtype = DATATYPE_TO_NUMPY[tensor.datatype]
    return np.frombuffer(tensor.raw_contents, dtype=dtype).reshape(list(tensor.shape))


def _annotate(span: trace.Span, decision: decision_pb2.Decision) -> None:
    span.set_attribute("hybridmesh.served_by", routing_pb2.Tier.Name(decision.served_by))
    span.set_attribute("hybridmesh.reason", decision_pb2.DecisionReason.Name(decision.reason))
    span.set_attribute("hybridmesh.escalation_score", decision.escalation_score)
    span.set_attribute("hybridmesh.threshold", decision.threshold)
    span.set_attribute("hybridmesh.policy_version", decision.policy_version)
    span.set_attribute("hybridmesh.degraded", decision.degraded)
    span.set_attribute("hybridmesh.data_left_site", decision.data_left_site)
    span.set_attribute("hybridmesh.queued_for_reconciliation", decision.queued_for_reconciliation)
    span.set_attribute("hybridmesh.edge_model_version", decision.edge_model.version)
    span.set_attribute("hybridmesh.cloud_model_version", decision.cloud_model.version)
    span.set_attribute(
        "hybridmesh.cost_micros", decision.cost.edge_micros + decision.cost.cloud_micros
    )
