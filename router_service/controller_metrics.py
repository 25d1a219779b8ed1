"""The threshold controllers' state as OpenTelemetry observable gauges, one series per
pair: ``hybridmesh.router.controller.{threshold,target,window_share,realized_share,
window_size,updates,catching_up}`` (read at collection time from
``ThresholdController.state``); the ``target_kind`` attribute says which target the pair
holds (``cloud_share`` or ``edge_error``). And the online edge-error estimates the
edge-error target uses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from router_service.edge_error_estimate import EdgeErrorEstimate, EdgeErrorEstimator
from router_service.threshold_controller import ControllerState, ThresholdController

GAUGES: dict[str, tuple[str, Callable[[ControllerState], float]]] = {
    "threshold": ("Escalation threshold the controller holds", lambda s: s.threshold),
    "target": (
        "The operator's target: a cloud share, or a maximum edge error among kept answers",
        lambda s: s.target,
    ),
    "window_share": (
        "Share of the window's scores at or above the threshold",
        lambda s: s.window_share,
    ),
    "realized_share": (
        "Share of the last realized_window requests that were escalated",
        lambda s: s.realized_share,
    ),
    "window_size": ("Scores in the controller's window", lambda s: float(s.window_size)),
    "updates": ("Threshold updates so far", lambda s: float(s.updates)),
    "catching_up": (
        "1 while the last step was clipped to the bounded step",
        lambda s: float(s.catching_up),
    ),
}


def register_controller_metrics(
    meter: metrics.Meter,
    controllers: Mapping[str, ThresholdController],
    estimators: Mapping[str, EdgeErrorEstimator] | None = None,
) -> None:
    """One observable gauge per state field; each observes every pair's controller.
    With ``estimators``, their gauges too (``register_edge_error_metrics``)."""
    if estimators is not None:
        register_edge_error_metrics(meter, estimators)
    for field, (description, read) in GAUGES.items():

        def callback(
            _options: CallbackOptions, read: Callable[[ControllerState], float] = read
        ) -> Iterable[Observation]:
            states = {pair: controller.state() for pair, controller in controllers.items()}
            return [
                Observation(read(state), {"pair": pair, "target_kind": _kind(state)})
                for pair, state in states.items()
            ]

        meter.create_observable_gauge(
            f"hybridmesh.router.controller.{field}", callbacks=[callback], description=description
        )


def _kind(state: ControllerState) -> str:
    return "edge_error" if state.holds_edge_error else "cloud_share"


ESTIMATE_GAUGES: dict[str, tuple[str, Callable[[EdgeErrorEstimate], float]]] = {
    "estimate": (
        "Share of shadow-checked kept answers the cloud disagreed with",
        lambda e: e.estimate,
    ),
    "lower": ("Lower bound of the estimate's Jeffreys interval", lambda e: e.lower),
    "upper": ("Upper bound of the estimate's Jeffreys interval", lambda e: e.upper),
    "samples": ("Shadow checks in the estimate's window", lambda e: float(e.samples)),
}


def register_edge_error_metrics(
    meter: metrics.Meter, estimators: Mapping[str, EdgeErrorEstimator]
) -> None:
    """``hybridmesh.router.edge_error.{estimate,lower,upper,samples}``, one series per
    pair (``edge_error_estimate.py``), read at collection time. ``estimators`` is read
    at each collection, so a pair's estimator replaced by a policy update is seen."""
    for field, (description, read) in ESTIMATE_GAUGES.items():

        def callback(
            _options: CallbackOptions, read: Callable[[EdgeErrorEstimate], float] = read
        ) -> Iterable[Observation]:
            return [
                Observation(read(estimator.estimate()), {"pair": pair})
                for pair, estimator in list(estimators.items())
            ]

        meter.create_observable_gauge(
            f"hybridmesh.router.edge_error.{field}", callbacks=[callback], description=description
        )
