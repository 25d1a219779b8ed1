"""Response assembly: the ``Decision`` record, edge and cloud rows merged, span attributes.

Conversions only; what each field says is decided in ``decision.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from google.protobuf import duration_pb2
from opentelemetry import trace

from hybridmesh.common.v1 import decision_pb2, model_pb2, routing_pb2, tensor_pb2
from hybridmesh.router.v1 import router_service_pb2
from router_service.decision import Settlement
from router_service.tier_api import TierAnswer
from services import attributes
from services.tensors import DATATYPE_TO_NUMPY, encode_tensor


@dataclass(frozen=True)
class Prices:
    """Per-item prices in micro-units of ``currency_code``."""

    currency_code: str
    edge_micros: int
    cloud_micros: int


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def build_response(
    *,
    request_id: str,
    settlement: Settlement,
    edge: TierAnswer | None,
    cloud: TierAnswer | None,
    threshold: float,
    policy_version: str,
    prices: Prices,
    timings: dict[str, float],
    total_s: float,
    queued: bool,
) -> router_service_pb2.InferResponse:
    """The response for ``settlement``. ``cloud`` is the answer that serves its CLOUD
    items (None when none). ``timings``: stage name -> seconds (StageTimings fields)."""
    items = settlement.items
    batch = len(items)
    stage_timings = decision_pb2.StageTimings(total=duration(total_s))
    for stage, seconds in timings.items():
        getattr(stage_timings, stage).CopyFrom(duration(seconds))
    span_context = trace.get_current_span().get_span_context()
    decision = decision_pb2.Decision(
        served_by=settlement.served_by,
        reason=settlement.reason,
        explanation=settlement.explanation,
        escalation_score=max(item.score for item in items),
        threshold=threshold,
        policy_version=policy_version,
        degraded=settlement.degraded,
        data_left_site=settlement.data_left_site,
        timings=stage_timings,
        cost=decision_pb2.Cost(
            currency_code=prices.currency_code,
            edge_micros=prices.edge_micros * batch if edge is not None else 0,
            cloud_micros=prices.cloud_micros * settlement.cloud_items_billed,
            all_cloud_micros=prices.cloud_micros * batch,
        ),
        trace_id=trace.format_trace_id(span_context.trace_id) if span_context.is_valid else "",
        queued_for_reconciliation=queued,
    )
    if edge is not None:
        decision.edge_model.CopyFrom(edge.model)
    if cloud is not None:
        decision.cloud_model.CopyFrom(cloud.model)
    cloud_rows = {index: item.cloud_row for index, item in enumerate(items) if item.cloud_row >= 0}
    outputs, classifications = merge_answers(edge, cloud, cloud_rows)
    return router_service_pb2.InferResponse(
        request_id=request_id,
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


def merge_answers(
    edge: TierAnswer | None, cloud: TierAnswer | None, cloud_rows: dict[int, int]
) -> tuple[list[tensor_pb2.Tensor], list[model_pb2.Classification]]:
    """Edge outputs with the cloud's rows put in place of the items it serves.

    ``cloud_rows``: item index -> row of ``cloud``. Without an edge answer the cloud
    answered every item, in order.
    """
    if edge is None:
        assert cloud is not None
        return list(cloud.outputs), list(cloud.classifications)
    classifications = list(edge.classifications)
    if not cloud_rows or cloud is None:
        return list(edge.outputs), classifications
    cloud_outputs = {tensor.name: tensor for tensor in cloud.outputs}
    items, rows = list(cloud_rows), list(cloud_rows.values())
    merged = []
    for tensor in edge.outputs:
        array = tensor_array(tensor).copy()
        if tensor.name in cloud_outputs:
            array[items] = tensor_array(cloud_outputs[tensor.name])[rows]
        merged.append(encode_tensor(tensor.name, array))
    for index, row in cloud_rows.items():
        classifications[index] = cloud.classifications[row]
    return merged, classifications


def tensor_array(tensor: tensor_pb2.Tensor) -> npt.NDArray[np.generic]:
    dtype = DATATYPE_TO_NUMPY[tensor.datatype]
    return np.frombuffer(tensor.raw_contents, dtype=dtype).reshape(list(tensor.shape))


def annotate(span: trace.Span, decision: decision_pb2.Decision) -> None:
    """The decision as ``hybridmesh.*`` attributes of the ``router.decide`` span."""
    span.set_attributes(
        {
            attributes.SERVED_BY: routing_pb2.Tier.Name(decision.served_by),
            attributes.REASON: decision_pb2.DecisionReason.Name(decision.reason),
            attributes.ESCALATION_SCORE: decision.escalation_score,
            attributes.THRESHOLD: decision.threshold,
            attributes.POLICY_VERSION: decision.policy_version,
            attributes.DEGRADED: decision.degraded,
            attributes.DATA_LEFT_SITE: decision.data_left_site,
            attributes.QUEUED_FOR_RECONCILIATION: decision.queued_for_reconciliation,
            attributes.EDGE_MODEL_VERSION: decision.edge_model.version,
            attributes.CLOUD_MODEL_VERSION: decision.cloud_model.version,
            attributes.COST_MICROS: decision.cost.edge_micros + decision.cost.cloud_micros,
        }
    )
