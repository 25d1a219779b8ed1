"""bench.scale_bench's summary and goals, and bench.cpu on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from bench.cpu import CpuMeter, child_pids, process_cpu_s, service_cpu_s
from bench.scale_bench import goals, summarise
from tests.helpers.waiting import eventually_sync


def _run(capacity: float, goodput: float, p99: float, shed_max: float | None) -> dict[str, Any]:
    cpu = {"router": 2000.0, "edge_node": 900.0}
    return {
        "workers_1": {
            "unloaded": {"p50_ms": 2.0, "p99_ms": 4.0},
            "capacity": {"rps": capacity, "cpu_us_per_request": cpu},
            "overload": {
                "goodput_rps": goodput,
                "admitted_p99_ms": p99,
                "shed_max_ms": shed_max,
                "sent": 100,
                "codes": {"OK": 60, "RESOURCE_EXHAUSTED": 40},
            },
        },
        "workers_2": {"capacity": {"rps": capacity * 1.5, "cpu_us_per_request": cpu}},
    }


def test_goals_are_judged_per_run_then_by_the_median() -> None:
    summary = summarise([_run(100, 95, 8.0, 5.0), _run(200, 150, 20.0, 30.0), _run(100, 92, 9, 4)])
    assert summary["goodput_over_capacity"] == pytest.approx(0.92)
    assert summary["admitted_p99_over_unloaded"] == pytest.approx(2.25)
    assert summary["workers_2_over_1"] == pytest.approx(1.5)
    assert summary["shed_share"] == pytest.approx(0.4)
    met = {row["goal"].split(": ")[-1]: row["met"] for row in goals(summary)}
    assert met == {
        "goodput >= 0.9x capacity": True,
        "admitted p99 <= 3x unloaded p99": True,
        "every shed request answered within 10 ms": True,
        "router throughput, 2 workers over 1 (reported, no goal)": True,
    }


def test_a_run_that_shed_nothing_misses_the_shed_goal_and_says_none() -> None:
    summary = summarise([_run(100, 50, 40.0, None)])
    rows = {row["goal"].split(": ")[-1]: row for row in goals(summary)}
    shed = rows["every shed request answered within 10 ms"]
    assert (shed["measured"], shed["met"]) == ("none", False)
    assert rows["goodput >= 0.9x capacity"]["met"] is False
    assert rows["admitted p99 <= 3x unloaded p99"]["measured"] == "10.0x"


def test_cpu_time_of_a_service_counts_its_workers() -> None:
    # The parent idles while its child (a "worker") burns 0.3 s of CPU, then both wait.
    worker = (
        "import time\nend = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\ntime.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {worker!r}])",
        ]
    )
    try:
        meter = CpuMeter({"service": parent.pid})
        meter.start()
        started = process_cpu_s(parent.pid)
        eventually_sync(lambda: service_cpu_s(parent.pid) - started >= 0.3, timeout_s=30)
        assert meter.per_request_us(1)["service"] >= 0.25e6
        # The parent alone idled: the time is its child's.
        assert process_cpu_s(parent.pid) - started < 0.1
        assert len(child_pids(parent.pid)) == 1
    finally:
        for child in child_pids(parent.pid):
            os.kill(child, 9)
        parent.kill()
        parent.wait()
    with pytest.raises(ProcessLookupError):
        process_cpu_s(parent.pid)
