"""``make bench``: routing quality, latency and throughput against baselines, and faults
under load, in one run; JSON + Markdown + PNG under ``--out`` and the latest figures in
``docs/benchmarks.md``.

``python -m bench --out results/bench [--quick] [--only faults]``; ``--only faults`` runs
the fault scenarios alone and rewrites only their section and goals in the page.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import plots
from bench.mesh_bench import measured_text

REPO_ROOT = Path(__file__).resolve().parent.parent
ANALYSIS = Path(__file__).resolve().parent / "analysis.md"


def run(command: list[str]) -> None:
    sys.stderr.write(f"$ {' '.join(command)}\n")
    subprocess.run(command, cwd=REPO_ROOT, check=True)


FAULT_SECTION = "## 3. Faults under load"
SCALE_SECTION = "## 8. Overload and worker processes (`python -m bench.scale_bench`)"
# A cancelled call's cloud call must end within this of the cancel (issue 15).
CANCEL_RUN_ON_GOAL_MS = 100.0


def _zero_failed(scenario: dict[str, Any], goal: str) -> dict[str, Any]:
    failed = sum(scenario["failed"].values())
    return {"goal": goal, "measured": f"{failed} failed", "met": failed == 0}


def fault_goals(faults: dict[str, Any]) -> list[dict[str, Any]]:
    scenarios = faults["scenarios"]
    goals = []
    killed = scenarios.get("cloud_killed")
    if killed is not None:
        opened, resumed = killed["breaker_opened_after_s"], killed["resumed_after_recovery_s"]
        goals += [
            _zero_failed(killed, "zero failed requests while the cloud is killed"),
            {
                "goal": "breaker open within 1 s of the cloud dying",
                "measured": "never" if opened is None else f"{opened:.2f} s",
                "met": opened is not None and opened <= 1.0,
            },
            {
                "goal": "escalation back within 10 s of recovery",
                "measured": "never" if resumed is None else f"{resumed:.2f} s",
                "met": resumed is not None and resumed <= 10.0,
            },
        ]
    for name, part in (("edge_hung", "edge node"), ("cloud_hung", "cloud service")):
        if name in scenarios:
            goals.append(
                _zero_failed(scenarios[name], f"zero failed requests while the {part} hangs")
            )
    cancelled = scenarios.get("cancel_mid_escalation", {}).get("cancellation")
    if cancelled is not None:
        worst = cancelled["ran_on_after_cancel_ms"]["max"]
        goals.append(
            {
                "goal": f"a cancelled escalation's cloud call ends within "
                f"{CANCEL_RUN_ON_GOAL_MS:.0f} ms of the cancel",
                "measured": "no cloud call cancelled" if worst is None else f"max {worst:.0f} ms",
                "met": worst is not None and worst <= CANCEL_RUN_ON_GOAL_MS,
            }
        )
    return goals


def fault_section(out: Path, docs_images: str, note: str = "") -> list[str]:
    lines = [FAULT_SECTION, ""]
    if note:
        lines += [note, ""]
    return [
        *lines,
        (out / "fault_bench.md").read_text().strip(),
        "",
        f"![fault timeline]({docs_images}/fault_timeline.png)",
        "",
    ]


def _goal_row(goal: str, measured: str, met: bool) -> str:
    return f"| {goal} | {measured} | {'yes' if met else '**no**'} |"


def report_markdown(out: Path, docs_images: str, elapsed_s: float, quick: bool) -> str:
    mesh = json.loads((out / "mesh_bench.json").read_text())
    faults = json.loads((out / "fault_bench.json").read_text())
    drift = json.loads((out / "drift_bench.json").read_text())
    shadow = json.loads((out / "shadow_bench.json").read_text())
    goal_rows: list[tuple[str, str, bool]] = (
        [(goal["goal"], measured_text(goal), goal["met"]) for goal in mesh["goals"]]
        + [(goal["goal"], goal["measured"], goal["met"]) for goal in fault_goals(faults)]
        + [(goal["goal"], goal["measured"], goal["met"]) for goal in drift["goals"]]
        + [(shadow["goal"]["goal"], shadow["goal"]["measured"], shadow["goal"]["met"])]
    )
    outbox = json.loads((out / "outbox_bench.json").read_text())
    goal_rows += [(goal["goal"], goal["measured"], goal["met"]) for goal in outbox["goals"]]
    scale = json.loads((out / "scale_bench.json").read_text())
    goal_rows += [(goal["goal"], goal["measured"], goal["met"]) for goal in scale["goals"]]
    evaluation = (out / "router-evaluation.md").read_text()
    # The evaluation's own title and regenerate line do not belong inside this page.
    evaluation_body = "\n".join(
        "#" + line if line.startswith("## ") else line  # its sections nest under ours
        for line in evaluation.splitlines()
        if not line.startswith("# ") and not line.startswith("Regenerate:")
    )
    lines = [
        "# Benchmarks",
        "",
        f"Latest `make bench` ({'quick' if quick else 'full'} run): "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, {elapsed_s / 60:.1f} min, "
        f"on this machine ({platform.machine()}, 2 shared cores; everything on loopback: the "
        "mesh's processes, Triton's CPU build and the load generator compete for the same "
        "cores). The WAN between edge and cloud is **emulated** by Envoy's fault filter "
        "(a fixed 40 ms), not a real network. Raw results: `results/bench/*.json`.",
        "",
        "Reproduce: `make bench` (or `.venv/bin/python -m bench --out results/bench`). Each part "
        "runs alone too: `python -m training.train_policy`, `python -m bench.mesh_bench`, "
        "`python -m bench.fault_bench`, `python -m bench.drift_bench`; "
        "`python -m bench --only faults` reruns the fault scenarios and rewrites only their "
        "section and goals here.",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "| --- | --- | --- |",
        *[_goal_row(goal, measured, met) for goal, measured, met in goal_rows],
        "",
        "## 1. Routing quality",
        "",
        "The learned router against its baselines on the test split (from a policy trained in "
        "this run into `results/bench/policies`; the committed policy is not touched).",
        "",
        evaluation_body.strip(),
        "",
        f"![accuracy against cloud share]({docs_images}/accuracy_vs_cloud_share.png)",
        "",
        "## 2. Latency and throughput",
        "",
        (out / "mesh_bench.md").read_text().strip(),
        "",
        f"![latency distributions]({docs_images}/latency_distributions.png)",
        "",
        *fault_section(out, docs_images),
        "## 4. Over-the-air update time",
        "",
        (out / "ota_bench.md").read_text().strip(),
        "",
        "## 5. The cloud-share target under drift, and the view's decision latency",
        "",
        (out / "drift_bench.md").read_text().strip(),
        "",
        "## 6. Shadow checks and the edge-error target",
        "",
        "`python -m bench.shadow_bench`: an offline simulation over the test split (and its "
        "drifted streams, `workload/drift.py`) with the real edge and cloud models' outputs "
        "and the committed policy. The estimate is of disagreement with the cloud (what a "
        "shadow check can see); the edge's error against the labels is shown beside it.",
        "",
        (out / "shadow_bench.md").read_text().strip(),
        "",
        "## 7. Outbox: cost per queued escalation at any depth, and the drain after an outage",
        "",
        (out / "outbox_bench.md").read_text().strip(),
        "",
        SCALE_SECTION,
        "",
        (out / "scale_bench.md").read_text().strip(),
        "",
    ]
    if ANALYSIS.exists():
        lines += [ANALYSIS.read_text().strip(), ""]
    return "\n".join(lines)


def splice_faults(page: str, faults: dict[str, Any], section: list[str]) -> str:
    """``page`` with its fault section replaced by ``section`` and its fault goal rows by
    those of ``faults`` (the rest of the page, measured in an earlier run, is kept)."""
    lines = page.splitlines()
    start = lines.index(FAULT_SECTION)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    lines[start:end] = section
    goals_at = lines.index("## Goals")
    table_end = next(i for i in range(goals_at + 3, len(lines)) if not lines[i].startswith("|"))
    known = {
        "zero failed requests while",
        "breaker open within 1 s of the cloud dying",
        "escalation back within 10 s of recovery",
        "a cancelled escalation's cloud call",
    }
    kept = [
        row
        for row in lines[goals_at + 4 : table_end]
        if not any(row.startswith(f"| {name}") for name in known)
    ]
    fresh = [_goal_row(g["goal"], g["measured"], g["met"]) for g in fault_goals(faults)]
    lines[goals_at + 4 : table_end] = kept + fresh
    if ANALYSIS.exists():  # the hand-written analysis, as it is now
        analysis = ANALYSIS.read_text().strip().splitlines()
        if analysis and analysis[0] in lines:
            lines[lines.index(analysis[0]) :] = analysis
    return "\n".join(lines) + "\n"


def faults_only(args: argparse.Namespace, out: Path) -> None:
    """Run the fault scenarios alone; rewrite only their part of docs/benchmarks.md."""
    fault = ["--before-s", "3", "--fault-s", "5", "--after-s", "10"] if args.quick else []
    command = [sys.executable, "-m", "bench.fault_bench", *fault]
    run([*command, "--out", str(out / "fault_bench.json")])
    faults = json.loads((out / "fault_bench.json").read_text())
    images = args.docs / "benchmarks"
    images.mkdir(parents=True, exist_ok=True)
    plots.fault_timeline(faults, images / "fault_timeline.png")
    note = (
        f"This section alone was regenerated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} "
        f"with `python -m bench --only faults{' --quick' if args.quick else ''}` "
        "(the rest of the page is from the run named at the top)."
    )
    page = args.docs / "benchmarks.md"
    page.write_text(splice_faults(page.read_text(), faults, fault_section(out, "benchmarks", note)))
    sys.stdout.write(f"wrote the fault section of {page} and {out}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where benchmarks.md goes")
    parser.add_argument("--quick", action="store_true", help="fewer runs and shorter phases")
    parser.add_argument(
        "--only", choices=["faults"], help="run only this part; update only its section"
    )
    args = parser.parse_args()
    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.only == "faults":
        faults_only(args, out)
        return
    python = sys.executable
    shutil.rmtree(out / "policies", ignore_errors=True)
    run(
        [
            python, "-m", "training.train_policy",
            "--policies", str(out / "policies"),
            "--report", str(out / "router-evaluation"),
        ]
    )  # fmt: skip
    mesh = (
        ["--runs", "1", "--count", "100", "--wan-count", "30", "--seconds", "2"]
        if args.quick
        else []
    )
    run([python, "-m", "bench.mesh_bench", *mesh, "--out", str(out / "mesh_bench.json")])
    fault = ["--before-s", "3", "--fault-s", "5", "--after-s", "10"] if args.quick else []
    run([python, "-m", "bench.fault_bench", *fault, "--out", str(out / "fault_bench.json")])
    rounds = ["--rounds", "3"] if args.quick else []
    run([python, "-m", "bench.ota_bench", *rounds, "--out", str(out / "ota_bench.json")])
    drift = ["--length", "4000", "--latency-calls", "1000"] if args.quick else []
    run([python, "-m", "bench.drift_bench", *drift, "--out", str(out / "drift_bench.json")])
    shadow = ["--seeds", "5", "--drift-requests", "8000"] if args.quick else []
    run([python, "-m", "bench.shadow_bench", *shadow, "--out", str(out / "shadow_bench.json")])
    outbox = ["--runs", "1", "--backlog", "2000", "--before-s", "8"] if args.quick else []
    command = [python, "-m", "bench.outbox_bench", "costs", *outbox]
    run([*command, "--out", str(out / "outbox_bench.json")])
    scale = ["--runs", "1", "--seconds", "2", "--count", "100"] if args.quick else []
    run([python, "-m", "bench.scale_bench", *scale, "--out", str(out / "scale_bench.json")])

    images = args.docs / "benchmarks"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "router-evaluation.png", images / "accuracy_vs_cloud_share.png")
    plots.latency_distributions(
        json.loads((out / "mesh_bench.json").read_text()), images / "latency_distributions.png"
    )
    plots.fault_timeline(
        json.loads((out / "fault_bench.json").read_text()), images / "fault_timeline.png"
    )
    for image in images.iterdir():
        shutil.copyfile(image, out / image.name)
    markdown = report_markdown(out, "benchmarks", time.monotonic() - started, args.quick)
    (out / "benchmarks.md").write_text(markdown)
    (args.docs / "benchmarks.md").write_text(markdown)
    sys.stdout.write(f"wrote {args.docs / 'benchmarks.md'} and {out}\n")


if __name__ == "__main__":
    main()
