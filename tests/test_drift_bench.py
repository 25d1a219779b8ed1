"""bench.drift_bench's arithmetic and its use of the router's own decision path, so the
drift report cannot claim a goal it did not meet."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from bench.drift_bench import (
    NO_VIEW_POLICY,
    REPO_ROOT,
    WINDOW,
    StreamOutputs,
    controller_for,
    goals,
    quality,
    route,
    share_deviation_pp,
    stream_outputs,
)
from router_service.escalation import load_policy
from router_service.features import router_features
from services.classification import to_probabilities
from training.train_policy import pair_models, run_model
from workload.drift import DRIFTS, step_shift


def exact_share(length: int, share: float) -> npt.NDArray[np.bool_]:
    """Escalations spread evenly: every WINDOW-request window holds exactly ``share``."""
    period = round(1 / share)
    flags: npt.NDArray[np.bool_] = np.arange(length) % period == 0
    return flags


def test_the_share_deviation_is_over_every_window_after_the_first() -> None:
    escalated = exact_share(5 * WINDOW, 0.2)
    escalated[:WINDOW] = True  # the first 1,000 requests do not count
    assert share_deviation_pp(escalated) == {"sliding": 0.0, "consecutive": 0.0}
    # 30 extra escalations straddling two consecutive windows: each consecutive window
    # sees 15, one sliding window sees all 30.
    burst = exact_share(5 * WINDOW, 0.2)
    free = np.flatnonzero(~burst)
    extra = [*free[free >= 2 * WINDOW + 900][:15], *free[free >= 3 * WINDOW][:15]]
    burst[extra] = True
    deviation = share_deviation_pp(burst)
    assert deviation["consecutive"] == pytest.approx(1.5)
    assert deviation["sliding"] == pytest.approx(3.0)


def outputs_of(scores: list[float], edge: list[bool], cloud: list[bool]) -> StreamOutputs:
    return StreamOutputs(
        scores=np.asarray(scores, dtype=np.float32),
        top1=np.full(len(scores), 0.9, dtype=np.float32),
        edge_correct=np.asarray(edge),
        cloud_correct=np.asarray(cloud),
    )


def test_quality_serves_the_cloud_answer_for_escalated_requests_only() -> None:
    n = WINDOW + 4
    outputs = outputs_of([0.0] * n, [True] * WINDOW + [False, False, True, True], [True] * n)
    escalated = np.zeros(n, dtype=np.bool_)
    escalated[WINDOW] = True  # one wrong edge answer fixed by the cloud, one kept wrong
    result = quality(outputs, escalated)
    assert result["cloud_share"] == 0.25
    assert result["accuracy"] == 0.75
    assert result["edge_kept_error"] == pytest.approx(1 / 3)


def test_routing_uses_the_threshold_in_force_and_feeds_the_controller() -> None:
    policy = load_policy(NO_VIEW_POLICY)
    rng = np.random.default_rng(1)
    # Scores that shift up after 3,000 requests: the fixed threshold escalates more.
    scores = np.concatenate([rng.beta(1, 30, 3000), rng.beta(1, 8, 5000)]).tolist()
    outputs = outputs_of(scores, [True] * len(scores), [True] * len(scores))
    fixed = route(outputs, policy, None)
    assert np.array_equal(fixed, outputs.scores >= policy.threshold)
    controller = controller_for(policy)
    controlled = route(outputs, policy, controller)
    assert controller.state().updates > 0
    assert controller.threshold != policy.threshold
    assert abs(controlled[4000:].mean() - 0.2) < 0.02
    assert abs(fixed[4000:].mean() - 0.2) > 0.2


def test_stream_scores_are_the_served_policys_scores_of_the_real_models() -> None:
    models = pair_models(
        REPO_ROOT / "models/catalog.toml", "fashion-mnist", REPO_ROOT / "models/store"
    )
    policy = load_policy(NO_VIEW_POLICY)
    stream = step_shift(DRIFTS["gaussian_blur"], length=40, shift_at=20)
    outputs = stream_outputs(models, policy, stream.images, stream.labels)
    edge = to_probabilities(run_model(models.edge, models.pair, stream.images), False)
    batched = policy.score(router_features(edge, stream.images))
    np.testing.assert_allclose(outputs.scores, batched, atol=1e-5)
    assert np.array_equal(outputs.edge_correct, edge.argmax(axis=1) == stream.labels)
    assert outputs.cloud_correct.mean() > 0.5


def report_with(controller_pp: float, p99_us: float) -> dict[str, Any]:
    def stream(drift: str, shift_at: int, pp: float) -> dict[str, Any]:
        return {"drift": drift, "shift_at": shift_at, "controller": {"sliding": pp},
                "fixed": {"sliding": 12.0}}  # fmt: skip

    return {
        "streams": [
            stream("none", 0, 0.5),
            stream("cutout", 0, 9.0),
            stream("cutout", 2000, controller_pp),
        ],
        "view_latency": {
            "decision_us": {"p99": p99_us, "p50": 30.0},
            "served_decision_us": {"p50": 20.0},
            "view_extra_edge_run_us": {"p50": 40.0},
        },
    }


def test_goals_judge_the_step_streams_and_the_decision_p99() -> None:
    met = goals(report_with(1.9, 45.0))
    assert [row["met"] for row in met] == [True, True]  # the from-start stream is not a goal row
    assert "fixed threshold 12.0 pp" in met[0]["measured"]
    missed = goals(report_with(2.1, 51.0))
    assert [row["met"] for row in missed] == [False, False]
