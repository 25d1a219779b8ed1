"""The router's request flow: which tier is called when, over the tier interfaces.

Sequencing only. What the policy allows is ``policy.py``; which items escalate and
what every decision field says is ``decision.py``; how long each attempt may take is
``budget.py``; the response is assembled in ``response.py``. The tiers are
``tier_api`` interfaces (gRPC clients in ``tiers.py``), so tests drive this with
scripted tiers.

Flow: validate -> budget -> hard policy -> [CLOUD_ONLY: cloud first] -> [tight
deadline: hedge the cloud beside the edge] -> edge (capped, leaving the cloud's p95
for the fallback; skipped when its health check says it is down and the cloud may
answer) -> classifier -> escalate the wanted items -> settle -> outbox -> response.
The request's lifetime bounds all of it: a cancelled caller cancels every call and
hedge in flight (``asyncio`` cancellation; see ``services/channels.py`` for the
interceptor that makes it reach the wire), and nothing is recorded for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import numpy.typing as npt
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace

from hybridmesh.common.v1 import decision_pb2, tensor_pb2
from hybridmesh.router.v1 import router_service_pb2
from router_service.breaker import BreakerState
from router_service.budget import AttemptBudget
from router_service.config import RouterSettings
from router_service.decision import (
    AttemptResult,
    CloudAttempt,
    EdgeFailure,
    EscalationPlan,
    Purpose,
    Settlement,
    edge_first_settlement,
    plan_escalation,
    settle,
)
from router_service.edge_error_estimate import EdgeErrorEstimator
from router_service.escalation import ScoringPolicy
from router_service.features import router_features
from router_service.latency import RollingLatency
from router_service.metrics import RouterMetrics
from router_service.outbox import OutboxItem, Priority
from router_service.policy import PolicyVerdict, RequestConstraints, Situation, evaluate
from router_service.reconciler import Reconciler, sampled
from router_service.request_validation import PairSpec, validate_request
from router_service.response import Prices, annotate, build_response, tensor_array
from router_service.shadow import KeptAnswers, LabelSink, ShadowChecker, ShadowSettings
from router_service.threshold_controller import ControllerSettings, ThresholdController
from router_service.tier_api import CloudTierApi, EdgeTierApi, TierAnswer, TierUnavailableError
from services import attributes
from services.classification import softmax, softmax_one_row
from services.errors import DeadlineExceededError, UnavailableError
from services.tensors import encode_tensor
from services.validation import check_duration
from services.views import view_output_name

__all__ = ["PairSpec", "Router"]

# Share of the remaining budget every last attempt leaves for the answer (see
# Router._answer_reserve_s): 25 ms of a 0.5 s deadline, 100 ms of 2 s.
ANSWER_RESERVE_SHARE = 0.05
ANSWER_RESERVE_CAP = 0.25

EdgeAnswerListener = Callable[[router_service_pb2.InferResponse], None]


@dataclass(frozen=True)
class _Routed:
    """A validated request and what the policy allows for it; fixed for its lifetime."""

    request: router_service_pb2.InferRequest
    request_id: str
    pair: PairSpec
    inputs: npt.NDArray[np.generic]
    constraints: RequestConstraints
    verdict: PolicyVerdict
    started: float
    deadline: float
    # The pair's policy this request started with: an over-the-air swap mid-request
    # does not mix one version's threshold with another's scores.
    policy: ScoringPolicy
    # The threshold in force: the policy's, or the pair's online controller's.
    threshold: float

    @property
    def batch(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def top_k(self) -> int:
        return self.request.top_k or 1

    @property
    def anonymiser(self) -> str:
        return self.pair.anonymiser if self.constraints.requires_anonymiser else ""


@dataclass
class _Facts:
    """What has happened so far, appended in order; settled by ``decision.settle``."""

    edge: TierAnswer | None = None
    edge_failure: EdgeFailure | None = None
    plan: EscalationPlan | None = None
    attempts: list[CloudAttempt] = field(default_factory=list)
    # The cloud answer that serves the CLOUD items.
    cloud: TierAnswer | None = None
    hedge: asyncio.Task[TierAnswer] | None = None
    hedge_reason: str = ""
    # The edge's outputs for the policy's test-time views (router features only; never
    # in the response): output name -> tensor.
    view_outputs: dict[str, tensor_pb2.Tensor] = field(default_factory=dict)
    # When the last tier call ended (the router's own tail is measured from here).
    calls_ended_at: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def attempted(self, purpose: Purpose) -> CloudAttempt | None:
        return next((a for a in self.attempts if a.purpose is purpose), None)


class Router:
    def __init__(
        self,
        settings: RouterSettings,
        *,
        pairs: Sequence[PairSpec],
        edge: EdgeTierApi,
        cloud: CloudTierApi,
        policies: Mapping[str, ScoringPolicy],
        tracer: trace.Tracer,
        metrics: RouterMetrics | None = None,
        reconciler: Reconciler | None = None,
        clock: Callable[[], float] = time.monotonic,
        meter: otel_metrics.Meter | None = None,
        shadow_labels: LabelSink | None = None,
    ) -> None:
        """``meter`` counts shadow checks; ``shadow_labels`` records their labels (the
        outbox's reconciled table)."""
        self._settings = settings
        self._reconciler = reconciler
        self._pairs = {pair.name: pair for pair in pairs}
        self.edge = edge
        self.cloud = cloud
        missing = sorted(set(self._pairs) - set(policies))
        if missing:
            raise ValueError(f"no policy for pair(s) {missing}")
        # Replaced whole (install_policy), never mutated: a request keeps the mapping,
        # and so the policy, it started with.
        self.policies: Mapping[str, ScoringPolicy] = dict(policies)
        self._tracer = tracer
        self._metrics = metrics
        self._clock = clock
        # Per pair: the edge's error among kept answers, from shadow checks (shadow.py).
        self.edge_error: dict[str, EdgeErrorEstimator] = {
            name: self._new_estimator() for name in self._pairs
        }
        self.shadow: ShadowChecker | None = None
        if settings.shadow_check_rate > 0:
            self.shadow = ShadowChecker(
                ShadowSettings(
                    rate=settings.shadow_check_rate,
                    max_in_flight=settings.shadow_max_in_flight,
                    timeout_s=settings.shadow_timeout_s,
                    internal=settings.shadow_check_internal,
                    cloud_price_micros=settings.cloud_price_micros,
                ),
                cloud,
                self.edge_error,
                tracer=tracer,
                meter=meter,
                labels=shadow_labels,
                bill=metrics.record_shadow if metrics is not None else None,
            )
        # The operator's ONE target held online, per pair (threshold_controller.py): a
        # cloud share or a maximum edge error; none unless one is set.
        share, edge_error = (
            settings.controller_target_share,
            settings.controller_target_edge_error,
        )
        self._controller_settings = (
            ControllerSettings(target_share=share, target_edge_error=edge_error)
            if share is not None or edge_error is not None
            else None
        )
        self.controllers: dict[str, ThresholdController] = (
            {name: self._new_controller(name, policy) for name, policy in self.policies.items()}
            if self._controller_settings is not None
            else {}
        )
        self._budget = AttemptBudget(
            floor_s=settings.attempt_floor_s,
            p99_multiple=settings.attempt_p99_multiple,
            default_cap_s=settings.attempt_cap_default_s,
            default_reserve_s=settings.fallback_reserve_default_s,
            reserve_margin_s=settings.outbox_write_reserve_s,
        )
        # The router's own time from the last tier call's end to its answer.
        self._tail = RollingLatency()
        self._prices = Prices(
            settings.currency_code, settings.edge_price_micros, settings.cloud_price_micros
        )

    @property
    def pair_names(self) -> list[str]:
        return sorted(self._pairs)

    def install_policy(self, pair: str, policy: ScoringPolicy) -> None:
        """Swap one pair's policy (over-the-air update); the other pairs' stay as they are.
        The pair's threshold controller, if any, restarts from the new policy's threshold."""
        if pair not in self._pairs or policy.metadata.pair != pair:
            raise ValueError(f"policy for {policy.metadata.pair!r} cannot serve pair {pair!r}")
        self.policies = {**self.policies, pair: policy}
        # A new policy scores on its own scale: the old checks' scores no longer apply.
        self.edge_error[pair] = self._new_estimator()
        if pair in self.controllers:
            self.controllers[pair] = self._new_controller(pair, policy)

    def _threshold_for(self, pair: str) -> float:
        controller = self.controllers.get(pair)
        return controller.threshold if controller is not None else self.policies[pair].threshold

    def _new_controller(self, pair: str, policy: ScoringPolicy) -> ThresholdController:
        assert self._controller_settings is not None
        return ThresholdController(
            self._controller_settings, policy.threshold, self._clock, self.edge_error[pair]
        )

    def _new_estimator(self) -> EdgeErrorEstimator:
        return EdgeErrorEstimator(
            self._settings.edge_error_window, self._settings.edge_error_confidence
        )

    async def infer(
        self,
        request: router_service_pb2.InferRequest,
        time_remaining_s: float | None,
        *,
        on_edge_answer: EdgeAnswerListener | None = None,
    ) -> router_service_pb2.InferResponse:
        """Route one request. ``on_edge_answer`` receives the edge answer before an
        escalation is sent (the progressive stream's first message).

        Raises ServiceError subclasses (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE naming
        each tier and why, DEADLINE_EXCEEDED); CancelledError when the caller leaves.
        """
        started = self._clock()
        with self._tracer.start_as_current_span("router.decide") as span:
            routed = self._begin(request, time_remaining_s, started, span)
            facts = _Facts(timings={"policy": self._clock() - started})
            try:
                await self._route(routed, facts, on_edge_answer)
            except asyncio.CancelledError:
                # The caller left: every call in flight is cancelled with this task, and
                # nothing is billed, queued or counted for it.
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
                span.set_attribute(attributes.CANCELLED, True)
                raise
            finally:
                hedge = facts.hedge
                if hedge is not None and not hedge.done():
                    hedge.cancel()
                elif hedge is not None and not hedge.cancelled():
                    hedge.exception()  # retrieved, whatever became of the request
            settlement = settle(
                routed.batch,
                routed.constraints,
                facts.plan,
                facts.attempts,
                edge_failure=facts.edge_failure,
                hedged=facts.hedge_reason,
            )
            queued = await self._queue_owed(routed, facts, settlement)
            response = self._respond(routed, facts, settlement, final=True, queued=queued)
            self._shadow_check(routed, facts, settlement)
            if facts.calls_ended_at is not None:
                self._tail.observe(self._clock() - facts.calls_ended_at)
            annotate(span, response.decision)
            if self._metrics is not None:
                self._metrics.record(response.decision, [p.served_by for p in response.predictions])
            return response

    # -- sequencing ------------------------------------------------------------------

    async def _route(
        self, routed: _Routed, facts: _Facts, on_edge_answer: EdgeAnswerListener | None
    ) -> None:
        everything = tuple(range(routed.batch))
        if routed.verdict.cloud_first:
            # Asked for: no cap from the cloud's history, only the edge's reserve kept.
            timeout = self._budget.leaving_reserve(
                self._remaining(routed) - self._answer_reserve_s(self._remaining(routed)),
                self.edge.latency.p95,
            )
            if await self._call_cloud(routed, facts, Purpose.CLOUD_ONLY, everything, timeout):
                return
        else:
            self._maybe_hedge(routed, facts)
        if not await self._call_edge(routed, facts):
            await self._cloud_after_edge_failure(routed, facts)
            return
        facts.plan = plan = self._plan(routed, facts)
        if not plan.escalate:
            self._resolve_hedge(facts, routed.batch, rows=())
            return
        if on_edge_answer is not None:
            # A hedge already went out: the first message says so (and bills it).
            hedged = routed.batch if facts.hedge is not None else 0
            on_edge_answer(
                self._respond(routed, facts, edge_first_settlement(plan, hedged), final=False)
            )
        if facts.hedge is not None:
            await self._await_hedge(facts, routed.batch, plan.escalate)
            return
        await self._call_cloud(
            routed, facts, Purpose.ESCALATION, plan.escalate, self._cloud_timeout(routed)
        )

    async def _call_edge(self, routed: _Routed, facts: _Facts) -> bool:
        """The edge attempt; False (and ``facts.edge_failure``) when it did not answer.

        When the cloud could take over, the edge gets its cap (``budget.py``); past it
        the cloud is called beside the still-running edge (a hedged fallback) and the
        first answer wins, so a hung edge costs the cap, and a slow but alive edge
        still answers when the cloud cannot.
        """
        cloud_can_take_over = routed.verdict.cloud_allowed and not facts.attempts
        if self.edge.health.known_down and cloud_can_take_over:
            facts.edge_failure = EdgeFailure("edge node is down (health check); not called")
            return False
        # Kept back even with no fallback: time to say, within the deadline, that no
        # tier could answer (UNAVAILABLE naming each), rather than let the caller's
        # deadline expire with no reason.
        remaining = self._remaining(routed)
        remaining -= self._answer_reserve_s(remaining)
        if remaining <= 0:
            raise DeadlineExceededError("the deadline passed before the edge could be called")
        edge_call = asyncio.create_task(
            self.edge.infer(
                request_id=routed.request_id,
                model=routed.pair.edge_model,
                inputs=routed.request.inputs,
                top_k=routed.top_k,
                timeout_s=remaining,
                views=routed.policy.metadata.views,
            )
        )
        racing: asyncio.Task[TierAnswer] | None = None
        try:
            if cloud_can_take_over and facts.hedge is None:
                cap = self._budget.timeout(
                    remaining,
                    self.edge.latency.quantile(0.99),
                    self.cloud.latency.p95,
                    fallback_possible=True,
                )
                await asyncio.wait({edge_call}, timeout=cap)
                if not edge_call.done():
                    self._start_hedge(routed, facts, f"edge slower than its {cap * 1e3:.0f} ms cap")
                    racing = facts.hedge
            # A hedge for a tight deadline waits for the edge (a confident edge answer
            # wins); one started past the edge's cap races it.
            if not await self._first_answer(edge_call, racing):
                facts.edge_failure = EdgeFailure("edge slower than the cloud, which answered")
                return False
            facts.edge, facts.view_outputs = _split_views(
                edge_call.result(), routed.policy.metadata.views
            )
        except TierUnavailableError as error:
            facts.edge_failure = EdgeFailure(_why(error))
            return False
        finally:
            facts.calls_ended_at = self._clock()
            if not edge_call.done():
                edge_call.cancel()
            elif not edge_call.cancelled():
                edge_call.exception()  # retrieved: a loser's failure is not "never retrieved"
        facts.timings["edge"] = facts.edge.elapsed_s
        return True

    @staticmethod
    async def _first_answer(
        edge_call: asyncio.Task[TierAnswer], hedge: asyncio.Task[TierAnswer] | None
    ) -> bool:
        """Wait until the edge is done, or the hedge answered first (False)."""
        while not edge_call.done():
            pending: set[asyncio.Task[TierAnswer]] = {edge_call}
            if hedge is not None and not hedge.done():
                pending.add(hedge)
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if (
                hedge is not None
                and hedge.done()
                and not hedge.cancelled()
                and hedge.exception() is None
            ):
                return edge_call.done() and edge_call.exception() is None
        return True

    async def _cloud_after_edge_failure(self, routed: _Routed, facts: _Facts) -> None:
        """The edge did not answer: the cloud answers every item, if the policy allows
        and it has not failed already; else UNAVAILABLE naming each tier and why."""
        assert facts.edge_failure is not None
        edge_why = facts.edge_failure.detail
        blocked = routed.verdict.cloud_blocked_reason
        if blocked == decision_pb2.DECISION_REASON_DEADLINE_TOO_SHORT:
            # Only a forecast (the cloud's p95 against the budget): with the edge gone it
            # is the one chance left, so the cloud gets whatever remains.
            blocked = None
        earlier = facts.attempted(Purpose.CLOUD_ONLY)
        if blocked is not None:
            cloud_why = f"may not serve ({decision_pb2.DecisionReason.Name(blocked)})"
        elif earlier is not None:
            cloud_why = earlier.detail
        else:
            everything = tuple(range(routed.batch))
            if facts.hedge is not None:
                await self._await_hedge(facts, routed.batch, everything)
            else:
                await self._call_cloud(
                    routed,
                    facts,
                    Purpose.EDGE_FALLBACK,
                    everything,
                    self._remaining(routed),
                )
            if facts.cloud is not None:
                return
            cloud_why = facts.attempts[-1].detail
        raise UnavailableError(f"no tier could answer: edge: {edge_why}; cloud: {cloud_why}")

    async def _call_cloud(
        self,
        routed: _Routed,
        facts: _Facts,
        purpose: Purpose,
        items: tuple[int, ...],
        timeout_s: float,
    ) -> bool:
        """Send ``items`` to the cloud; True when it answered (they are cloud-served).
        A cloud known down by its health check is refused by its breaker (opened by the
        health watch), so nothing is sent."""
        if timeout_s <= 0:
            facts.attempts.append(CloudAttempt(purpose, items, AttemptResult.NO_TIME, "no time"))
            return False
        subset = (
            routed.request.inputs
            if len(items) == routed.batch
            else [
                encode_tensor(
                    routed.pair.input_name, np.ascontiguousarray(routed.inputs[list(items)])
                )
            ]
        )
        try:
            answer = await self.cloud.infer(
                request_id=routed.request_id,
                model=routed.pair.cloud_model,
                inputs=subset,
                top_k=routed.top_k,
                timeout_s=timeout_s,
                privacy_class=routed.constraints.privacy_class,
                anonymiser=routed.anonymiser,
                purpose=purpose.value,
            )
        except TierUnavailableError as error:
            facts.attempts.append(CloudAttempt(purpose, items, _result_of(error), _why(error)))
            return False
        finally:
            facts.calls_ended_at = self._clock()
        rows = tuple((index, row) for row, index in enumerate(items))
        facts.attempts.append(CloudAttempt(purpose, items, AttemptResult.ANSWERED, rows=rows))
        self._adopt(facts, answer)
        return True

    def _maybe_hedge(self, routed: _Routed, facts: _Facts) -> None:
        """Start the cloud call now, beside the edge, when there is no time to do them in
        turn: the remaining budget is below ``hedge_below_budget_s``, or below edge p95 +
        cloud p95. If the edge answer turns out confident, the cloud call is cancelled."""
        if not routed.verdict.cloud_allowed:
            return
        remaining = self._remaining(routed)
        edge_p95, cloud_p95 = self.edge.latency.p95, self.cloud.latency.p95
        sequential_too_slow = (
            edge_p95 is not None and cloud_p95 is not None and remaining < edge_p95 + cloud_p95
        )
        if remaining >= self._settings.hedge_below_budget_s and not sequential_too_slow:
            return
        self._start_hedge(routed, facts, "tight deadline")

    def _start_hedge(self, routed: _Routed, facts: _Facts, why: str) -> None:
        """Call the cloud with every item, beside the edge."""
        facts.hedge_reason = why
        facts.hedge = asyncio.create_task(
            self.cloud.infer(
                request_id=routed.request_id,
                model=routed.pair.cloud_model,
                inputs=routed.request.inputs,
                top_k=routed.top_k,
                timeout_s=self._cloud_timeout(routed),
                privacy_class=routed.constraints.privacy_class,
                anonymiser=routed.anonymiser,
                purpose=Purpose.HEDGE.value,
            )
        )

    async def _await_hedge(self, facts: _Facts, batch: int, serves: tuple[int, ...]) -> None:
        """Wait for the hedge; its answer serves ``serves`` (it carries every item)."""
        assert facts.hedge is not None
        with contextlib.suppress(TierUnavailableError):  # recorded by _resolve_hedge
            await facts.hedge
        self._resolve_hedge(facts, batch, rows=tuple((index, index) for index in serves))

    def _resolve_hedge(self, facts: _Facts, batch: int, rows: tuple[tuple[int, int], ...]) -> None:
        """Record the hedge as an attempt; cancel it if it is still running (the edge
        answer won). A cancelled hedge had already been sent."""
        hedge = facts.hedge
        if hedge is None:
            return
        everything = tuple(range(batch))
        if not hedge.done():
            hedge.cancel()
            result = CloudAttempt(Purpose.HEDGE, everything, AttemptResult.CANCELLED)
        elif hedge.cancelled():
            result = CloudAttempt(Purpose.HEDGE, everything, AttemptResult.CANCELLED)
        elif (error := hedge.exception()) is not None:
            assert isinstance(error, TierUnavailableError), error
            result = CloudAttempt(Purpose.HEDGE, everything, _result_of(error), _why(error))
        else:
            result = CloudAttempt(Purpose.HEDGE, everything, AttemptResult.ANSWERED, rows=rows)
            self._adopt(facts, hedge.result())
        facts.attempts.append(result)

    def _plan(self, routed: _Routed, facts: _Facts) -> EscalationPlan:
        assert facts.edge is not None
        started = self._clock()
        probabilities = edge_probabilities(routed.pair, facts.edge.outputs[0])
        views = {
            view: edge_probabilities(
                routed.pair, facts.view_outputs[view_output_name(facts.edge.outputs[0].name, view)]
            )
            for view in routed.policy.metadata.views
        }
        features = router_features(probabilities, routed.inputs, views)
        scores = routed.policy.score(features)
        facts.timings["classifier"] = self._clock() - started
        controller = self.controllers.get(routed.pair.name)
        if controller is not None:
            controller.observe(scores.tolist())
        return plan_escalation(
            routed.verdict,
            routed.constraints,
            scores,
            features[:, 0],  # the top-1 probability (features.SUMMARY_FEATURES)
            routed.threshold,
            routed.policy.version,
            cloud_already_failed=facts.attempted(Purpose.CLOUD_ONLY) is not None,
        )

    def _shadow_check(self, routed: _Routed, facts: _Facts, settled: Settlement) -> None:
        """Maybe start a background shadow check of the answers kept on the edge; the
        response is already built and does not wait for it."""
        if self.shadow is None or facts.edge is None or facts.plan is None:
            return
        kept = tuple(
            index
            for index, item in enumerate(settled.items)
            if item.reason == decision_pb2.DECISION_REASON_EDGE_CONFIDENT
        )
        if not kept:
            return
        edge = facts.edge
        self.shadow.maybe_check(
            KeptAnswers(
                request_id=routed.request_id,
                pair=routed.pair,
                privacy_class=routed.constraints.privacy_class,
                inputs=routed.inputs,
                indices=kept,
                edge_classes=tuple(edge.classifications[i].top_k[0].class_index for i in kept),
                scores=tuple(facts.plan.scores[i] for i in kept),
                edge_model=f"{edge.model.name}:{edge.model.version}",
            )
        )

    async def _queue_owed(self, routed: _Routed, facts: _Facts, settled: Settlement) -> bool:
        """Store the items owed to the cloud (or a sample of confident ones) in the
        outbox, so the cloud checks them once it is back. True when stored."""
        if self._reconciler is None or facts.edge is None:
            return False
        indices, priority = list(settled.owed), Priority.ESCALATION
        if not indices:
            confident = all(
                item.reason == decision_pb2.DECISION_REASON_EDGE_CONFIDENT for item in settled.items
            )
            if not confident or not sampled(routed.request_id, self._settings.outbox_sample_rate):
                return False
            indices, priority = list(range(routed.batch)), Priority.SAMPLE
        edge = facts.edge
        stored = await self._reconciler.enqueue(
            OutboxItem(
                request_id=routed.request_id,
                priority=priority,
                pair=routed.pair.name,
                privacy_class=routed.constraints.privacy_class,
                top_k=routed.top_k,
                item_indices=tuple(indices),
                edge_classes=tuple(edge.classifications[i].top_k[0].class_index for i in indices),
                edge_model=f"{edge.model.name}:{edge.model.version}",
                inputs=encode_tensor(
                    routed.pair.input_name, np.ascontiguousarray(routed.inputs[indices])
                ).SerializeToString(),
            )
        )
        return stored

    # -- helpers -----------------------------------------------------------------------

    def _begin(
        self,
        request: router_service_pb2.InferRequest,
        time_remaining_s: float | None,
        started: float,
        span: trace.Span,
    ) -> _Routed:
        """Validate, set the budget, apply hard policy."""
        pair, inputs, constraints = validate_request(
            request,
            self._pairs,
            max_top_k=self._settings.max_top_k,
            max_batch_size=self._settings.max_batch_size,
        )
        deadline = started + self._budget_s(request, time_remaining_s)
        batch = int(inputs.shape[0])
        verdict = evaluate(
            constraints,
            Situation(
                remaining_budget_s=deadline - self._clock(),
                cloud_p95_s=self.cloud.latency.p95,
                cloud_breaker_open=self.cloud.breaker.state is BreakerState.OPEN,
                cloud_cost_micros=self._settings.cloud_price_micros * batch,
            ),
        )
        routed = _Routed(
            request=request,
            request_id=request.request_id or uuid.uuid4().hex,
            pair=pair,
            inputs=inputs,
            constraints=constraints,
            verdict=verdict,
            started=started,
            deadline=deadline,
            policy=self.policies[pair.name],
            threshold=self._threshold_for(pair.name),
        )
        span.set_attributes(
            {
                attributes.REQUEST_ID: routed.request_id,
                attributes.PAIR: pair.name,
                attributes.BATCH_SIZE: batch,
                # Until something is sent: a request that fails still says nothing left.
                attributes.DATA_LEFT_SITE: False,
            }
        )
        return routed

    def _budget_s(
        self, request: router_service_pb2.InferRequest, time_remaining_s: float | None
    ) -> float:
        """Seconds this request may take: the gRPC deadline wins, then hints, then default.
        A malformed budget hint is refused even beside a deadline (it was ignored there)."""
        hinted = (
            # A day at most: a budget is a request's lifetime, not a schedule.
            check_duration(
                request.hints.budget, "hints.budget", min_seconds=0.0, max_seconds=86_400.0
            )
            if request.hints.HasField("budget")
            else None
        )
        if time_remaining_s is not None:
            budget = time_remaining_s
        elif hinted is not None:
            budget = hinted
        else:
            budget = self._settings.default_budget_s
        budget -= self._settings.budget_margin_s
        if budget <= 0:
            raise DeadlineExceededError("no time left to route this request")
        return budget

    def _remaining(self, routed: _Routed) -> float:
        return routed.deadline - self._clock()

    def _answer_reserve_s(self, remaining_s: float) -> float:
        """Time kept back from the last tier attempt to finish the request after it
        (settle, outbox write, response, or the error naming each tier): twice the
        router's own p99 of that tail, at least ``outbox_write_reserve_s`` and
        ``ANSWER_RESERVE_SHARE`` of what remains (event-loop lag on a busy host grows
        with the load, not with the work, and the tail p99 sees only finished calls)."""
        tail_p99 = self._tail.quantile(0.99)
        reserve = max(
            self._settings.outbox_write_reserve_s,
            2.0 * tail_p99 if tail_p99 else 0.0,
            ANSWER_RESERVE_SHARE * remaining_s,
        )
        # Never more than a quarter of what remains: a tail p99 inflated by a stall must
        # not leave the attempt itself no time (it would refuse work it could do).
        return min(reserve, ANSWER_RESERVE_CAP * max(remaining_s, 0.0))

    def _cloud_timeout(self, routed: _Routed) -> float:
        """An escalation ends early enough that a failure still leaves time to store the
        items in the outbox and answer with the edge's result within the deadline."""
        remaining = self._remaining(routed)
        return max(remaining - self._answer_reserve_s(remaining), remaining / 2)

    def _adopt(self, facts: _Facts, answer: TierAnswer) -> None:
        facts.cloud = answer
        facts.timings["cloud"] = answer.elapsed_s

    def _respond(
        self,
        routed: _Routed,
        facts: _Facts,
        settled: Settlement,
        *,
        final: bool,
        queued: bool = False,
    ) -> router_service_pb2.InferResponse:
        """The response for ``settled``; not ``final`` for the edge-first answer."""
        timings = dict(facts.timings)
        if not final:
            timings.pop("cloud", None)
        if queued and settled.owed:
            settled = dataclasses.replace(
                settled, explanation=f"{settled.explanation}; queued for reconciliation"
            )
        return build_response(
            request_id=routed.request_id,
            settlement=settled,
            edge=facts.edge,
            # The cloud model is named when its answer is in the response.
            cloud=facts.cloud if final and any(i.cloud_row >= 0 for i in settled.items) else None,
            threshold=routed.threshold,
            policy_version=routed.policy.version,
            prices=self._prices,
            timings=timings,
            total_s=self._clock() - routed.started,
            queued=queued,
        )


def edge_probabilities(pair: PairSpec, output: tensor_pb2.Tensor) -> npt.NDArray[np.float32]:
    """[n, classes] float32 probabilities from the edge's output tensor."""
    scores = tensor_array(output)
    if pair.outputs_probabilities:
        return scores.astype(np.float32)
    # One item is the usual request: scalar math beats numpy's per-call cost there.
    return softmax_one_row(scores) if scores.shape[0] == 1 else softmax(scores.astype(np.float32))


def _split_views(
    answer: TierAnswer, views: Sequence[str]
) -> tuple[TierAnswer, dict[str, tensor_pb2.Tensor]]:
    """The edge answer without its view outputs, and those outputs by name: the views
    feed the router's features and never reach the caller."""
    if not views:
        return answer, {}
    names = {view_output_name(answer.outputs[0].name, view) for view in views}
    kept = [tensor for tensor in answer.outputs if tensor.name not in names]
    extra = {tensor.name: tensor for tensor in answer.outputs if tensor.name in names}
    missing = names - set(extra)
    if missing:
        raise UnavailableError(f"the edge did not return the view output(s) {sorted(missing)}")
    return dataclasses.replace(answer, outputs=kept), extra


def _why(error: TierUnavailableError) -> str:
    return error.detail or (error.code.name if error.code is not None else "unavailable")


def _result_of(error: TierUnavailableError) -> AttemptResult:
    if error.refused:
        return AttemptResult.REFUSED
    return AttemptResult.FAILED if error.sent else AttemptResult.NOT_SENT
