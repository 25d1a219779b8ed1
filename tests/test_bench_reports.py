"""The benchmark's arithmetic: what the fault and mesh reports compute from raw samples.

The benchmarks themselves run real processes (``make bench``); these tests pin down how
their figures are derived, so a report cannot silently claim a goal it did not meet.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path

import pytest

from bench.decision_bench import goal
from bench.fault_bench import FAULTS, Sample, breaker_transitions, summarise
from bench.mesh_bench import goals, measured_text, ratios
from bench.plots import _open_spans
from hybridmesh.common.v1 import decision_pb2, routing_pb2
from services.logging import configure_logging, get_logger

TIMELINE = {
    "injected_at_s": 5.0,
    "recover_started_at_s": 15.0,
    "recovered_at_s": 17.0,
    "ended_at_s": 30.0,
}


def test_breaker_transitions_come_from_the_routers_own_log_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    log = get_logger("router")
    log.warning("breaker state change", target="cloud", old="closed", new="open")
    log.info("something else", target="cloud")
    log.warning("breaker state change", target="cloud", old="open", new="half_open")
    path = tmp_path / "router.log"
    path.write_text(stream.getvalue())
    first = json.loads(stream.getvalue().splitlines()[0])
    origin = first["timestamp"]
    transitions = breaker_transitions(path, datetime.fromisoformat(origin).timestamp())
    assert [(t["target"], t["old"], t["new"]) for t in transitions] == [
        ("cloud", "closed", "open"),
        ("cloud", "open", "half_open"),
    ]
    assert transitions[0]["at_s"] == 0.0
    assert 0.0 <= transitions[1]["at_s"] < 1.0


def ok(started: float, tier: int, degraded: bool = False, latency_s: float = 0.01) -> Sample:
    reason = decision_pb2.DECISION_REASON_EDGE_CONFIDENT
    return Sample(started, latency_s, "OK", tier, reason, degraded)


def test_the_fault_summary_counts_failures_and_times_breaker_and_recovery() -> None:
    edge, cloud = routing_pb2.TIER_EDGE, routing_pb2.TIER_CLOUD
    samples = [
        ok(1.0, cloud),
        ok(2.0, edge),
        Sample(6.0, 1.0, "DEADLINE_EXCEEDED"),
        ok(7.0, edge, degraded=True),
        ok(16.0, cloud),  # before recovery finished: does not count as resumed
        ok(18.0, cloud, degraded=True),  # degraded: not a real cloud answer
        ok(19.5, cloud, latency_s=0.5),  # the first real escalation after recovery
        ok(25.0, cloud),
    ]
    transitions = [
        {"at_s": 2.0, "target": "cloud", "old": "closed", "new": "open"},  # before the fault
        {"at_s": 5.4, "target": "edge", "old": "closed", "new": "open"},  # other breaker
        {"at_s": 5.75, "target": "cloud", "old": "closed", "new": "open"},
    ]
    summary = summarise(FAULTS["cloud_killed"], samples, transitions, TIMELINE)
    assert summary["requests"] == 8
    assert summary["failed"] == {"DEADLINE_EXCEEDED": 1}
    assert summary["success_rate"] == pytest.approx(7 / 8)
    assert summary["degraded_share"] == pytest.approx(2 / 7)
    assert summary["breaker_opened_after_s"] == pytest.approx(0.75)
    assert summary["resumed_after_recovery_s"] == pytest.approx(20.0 - 17.0)
    assert summary["recovery_took_s"] == pytest.approx(2.0)
    during = summary["during_fault"]
    assert during["requests"] == 2 and during["success_rate"] == pytest.approx(0.5)


def test_a_breaker_that_never_opened_or_escalation_that_never_resumed_says_so() -> None:
    samples = [ok(1.0, routing_pb2.TIER_EDGE), ok(20.0, routing_pb2.TIER_EDGE)]
    summary = summarise(FAULTS["cloud_killed"], samples, [], TIMELINE)
    assert summary["breaker_opened_after_s"] is None
    assert summary["resumed_after_recovery_s"] is None


def test_goals_are_judged_from_the_measured_ratios() -> None:
    row = {"p50_ms": 1.0, "p99_ms": 2.0, "throughput_rps": 1000.0}
    summary = {
        name: dict(row)
        for name in (
            "echo",
            "edge_direct",
            "envoy_proxy_edge",
            "router_edge",
            "router_colocated_edge",
            "triton_direct",
            "cloud_direct",
            "router_cloud",
            "router_cloud_wan",
            "router_escalated_wan",
        )
    }
    summary["router_edge"] = {"p50_ms": 2.1, "p99_ms": 3.0, "throughput_rps": 600.0}
    summary["router_colocated_edge"] = {"p50_ms": 1.3, "p99_ms": 2.0, "throughput_rps": 999.0}
    summary["cloud_direct"] = {"p50_ms": 1.2, "p99_ms": 2.0, "throughput_rps": 900.0}
    summary["router_cloud"] = {"p50_ms": 3.1, "p99_ms": 5.0, "throughput_rps": 300.0}
    summary["router_cloud_wan"] = {"p50_ms": 60.0, "p99_ms": 70.0}
    summary["router_escalated_wan"] = {"p50_ms": 62.0, "p99_ms": 70.0}
    ratio = ratios(summary)
    assert ratio["router_edge_over_edge_direct_p50"] == pytest.approx(2.1)
    assert ratio["router_cloud_wan_over_triton_plus_wan_p50"] == pytest.approx(60.0 / 41.0)
    verdicts = {goal["ratio"]: goal["met"] for goal in goals(ratio)}
    assert verdicts == {
        "router_colocated_edge_over_edge_direct_p50": True,  # 1.3x <= 1.3x
        "router_colocated_edge_over_envoy_proxy_throughput": False,  # 0.999x < 1.0x
        "router_edge_over_edge_direct_p50": False,  # 2.1x > 2.0x
        "router_cloud_over_triton_direct_p50": False,  # 3.1x > 3.0x
        "cloud_direct_over_triton_direct_p50": True,  # 1.2x <= 1.3x
        "router_cloud_wan_over_triton_plus_wan_p50": True,  # 1.46x <= 1.5x
    }


def test_the_decision_goal_is_its_cpu_p99_and_shows_the_wall_clock_beside_it() -> None:
    row = goal({"decision_cpu_p99_us": 50.0, "decision_p99_us": 900.0})
    assert row["met"] and row["measured"] == 50.0
    assert measured_text(row) == "50.0 µs CPU (wall-clock p99 900 µs)"
    assert not goal({"decision_cpu_p99_us": 50.1, "decision_p99_us": 50.1})["met"]
    ratio_row = {"measured": 1.234}
    assert measured_text(ratio_row) == "1.23x"


def test_breaker_open_spans_close_on_leaving_open_and_run_to_the_end_otherwise() -> None:
    changes = [
        {"at_s": 1.0, "target": "cloud", "new": "open"},
        {"at_s": 6.0, "target": "cloud", "new": "half_open"},
        {"at_s": 6.5, "target": "cloud", "new": "open"},
        {"at_s": 7.0, "target": "edge", "new": "open"},
    ]
    assert _open_spans(changes, "cloud", 30.0) == [(1.0, 6.0), (6.5, 30.0)]
    assert _open_spans(changes, "edge", 30.0) == [(7.0, 30.0)]
