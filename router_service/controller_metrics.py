"""The threshold controllers' state as OpenTelemetry observable gauges, one series per
pair: ``hybridmesh.router.controller.{threshold,target_share,window_share,realized_share,
window_size,updates,catching_up}`` (read at collection time from ``ThresholdController.state``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from router_service.threshold_controller import ControllerState, ThresholdController

GAUGES: dict[str, tuple[str, Callable[[ControllerState], float]]] = {
    "threshold": ("Escalation threshold the controller holds", lambda s: s.threshold),
    "target_share": ("The operator's cloud-share target", lambda s: s.target_share),
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
    meter: metrics.Meter, controllers: Mapping[str, ThresholdController]
) -> None:
    """One observable gauge per state field; each observes every pair's controller."""
    for field, (description, read) in GAUGES.items():

        def callback(
            _options: CallbackOptions, read: Callable[[ControllerState], float] = read
        ) -> Iterable[Observation]:
            return [
                Observation(read(controller.state()), {"pair": pair})
                for pair, controller in controllers.items()
            ]

        meter.create_observable_gauge(
            f"hybridmesh.router.controller.{field}", callbacks=[callback], description=description
        )
