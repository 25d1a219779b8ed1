"""The benchmark's pictures: latency distributions and the fault timeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

BIN_S = 0.5
CLOUD_TIERS = (2, 3)  # TIER_CLOUD, TIER_EDGE_AND_CLOUD


def latency_distributions(mesh: dict[str, Any], path: Path) -> Path:
    """One CDF per scenario, log time axis: where each hop's latency really lies."""
    figure, axis = plt.subplots(figsize=(9, 5))
    for scenario, samples in mesh["samples_ms"].items():
        values = np.sort(np.asarray(samples))
        axis.plot(values, np.linspace(0, 1, len(values)), label=scenario)
    axis.set_xscale("log")
    axis.set_xlabel("latency at concurrency 1 (ms, log scale)")
    axis.set_ylabel("share of calls at or below")
    axis.set_title("Latency by path, all runs pooled (WAN emulated at 40 ms)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="center", bbox_to_anchor=(0.75, 0.4))  # the empty 10-30 ms band
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _open_spans(
    transitions: list[dict[str, Any]], target: str, end: float
) -> list[tuple[float, float]]:
    """[(opened, left open)] for one breaker, from its state changes."""
    spans, opened = [], None
    for change in transitions:
        if change["target"] != target:
            continue
        if change["new"] == "open" and opened is None:
            opened = change["at_s"]
        elif change["new"] != "open" and opened is not None:
            spans.append((opened, change["at_s"]))
            opened = None
    if opened is not None:
        spans.append((opened, end))
    return spans


def fault_timeline(faults: dict[str, Any], path: Path) -> Path:
    """Per scenario: answers per second by kind, failures, the fault window and the
    router's breaker-open periods."""
    scenarios = faults["scenarios"]
    figure, axes = plt.subplots(len(scenarios), 1, figsize=(12, 3.2 * len(scenarios)), sharex=True)
    for axis, (name, row) in zip(np.atleast_1d(axes), scenarios.items(), strict=True):
        timeline = row["timeline"]
        end = timeline["ended_at_s"]
        edges = np.arange(0, end + BIN_S, BIN_S)

        def rate(selected: list[dict[str, Any]], edges: Any = edges) -> Any:
            """Completions per second in each bin."""
            counts, _ = np.histogram([s["started"] + s["latency_s"] for s in selected], edges)
            return counts / BIN_S

        samples = row["samples"]
        ok = [s for s in samples if s["code"] == "OK"]
        centres = edges[:-1] + BIN_S / 2
        axis.plot(centres, rate(ok), label="answered", color="tab:green")
        axis.plot(
            centres, rate([s for s in ok if s["degraded"]]), label="degraded", color="tab:orange"
        )
        axis.plot(
            centres,
            rate([s for s in ok if s["served_by"] in CLOUD_TIERS]),
            label="served by the cloud",
            color="tab:blue",
        )
        axis.plot(
            centres,
            rate([s for s in samples if s["code"] != "OK"]),
            label="failed",
            color="tab:red",
        )
        axis.axvspan(
            timeline["injected_at_s"],
            timeline["recover_started_at_s"],
            color="grey",
            alpha=0.15,
            label="fault",
        )
        axis.axvline(timeline["recovered_at_s"], color="grey", linestyle="--", linewidth=1)
        for index, (start, stop) in enumerate(
            _open_spans(row["breaker_transitions"], row["breaker"], end)
        ):
            axis.axvspan(
                start,
                stop,
                ymin=0.93,
                ymax=1.0,
                color="tab:red",
                alpha=0.6,
                label=f"{row['breaker']} breaker open" if index == 0 else None,
            )
        axis.set_title(f"{name}: {row['fault']}", fontsize=9)
        axis.set_ylabel("per second")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    np.atleast_1d(axes)[-1].set_xlabel("seconds since load started (dashed: part healthy again)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
