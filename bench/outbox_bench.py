"""Measure the outbox: write cost per item, the drain rate on the real local mesh, and
(``costs``, part of ``make bench``) what queueing costs the router at any depth and how
fast a backlog drains without hurting live traffic.

  python -m bench.outbox_bench write [--items 2000] [--runs 5]
  python -m bench.outbox_bench drain [--items 200] [--runs 3] [--rate 500]  (a fixed rate)
  python -m bench.outbox_bench costs [--runs 3] [--depths 0 5000 50000] [--backlog 5000]
                                     [--out results/bench/outbox_bench.json]

``write``: ``Outbox.put`` of one fashion-mnist item (784-byte input), one transaction
each, on a file in the current directory's filesystem, for synchronous FULL and NORMAL.
``drain``: starts the local mesh (real processes, 40 ms emulated WAN), kills the cloud
service, sends ``--items`` hard requests (each queued), restarts the cloud and reads the
reconciliation times from the outbox: rate = items / (last - first reconciled_at), so the
breaker's open period and the health poll before the first replay do not count.
``costs``: one local mesh. (1) Router CPU per queued escalation at each outbox depth:
the cloud service is killed; per run and depth (interleaved), the router is stopped, its
outbox file refilled with that many queued items (and as many reconciled rows of
history), the router restarted, and hard requests sent one at a time, each answered by
the edge and queued; CPU = utime + stime of the router process from /proc/<pid>/stat
over the measured requests, divided by their number. (2) Drain of a backlog under a
steady light load (the test split in order, a fixed request rate): the router starts
with ``--backlog`` queued items held back (next attempt far ahead), the load's p99 is
measured for a while, then one UPDATE makes every item due (as when the cloud is back)
and the load's p99 is measured until the outbox is empty; drain rate = items / (last -
first reconciled_at). Prints one JSON line per measurement and, with ``--out``, writes
the report (JSON + Markdown) with its goals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from router_service.outbox import Outbox, OutboxItem, Priority
from services.tensors import encode_tensor

REPO = Path(__file__).resolve().parent.parent


def _item(request_id: str, payload: bytes) -> OutboxItem:
    return OutboxItem(
        request_id=request_id,
        priority=Priority.ESCALATION,
        pair="fashion-mnist",
        privacy_class=1,
        top_k=1,
        item_indices=(0,),
        edge_classes=(3,),
        edge_model="fashion-edge:1",
        inputs=payload,
    )


def measure_write(items: int, runs: int) -> dict[str, float]:
    payload = encode_tensor("image", np.zeros((1, 1, 28, 28), dtype=np.uint8)).SerializeToString()
    medians: dict[str, float] = {}
    for synchronous in ("FULL", "NORMAL"):
        per_run = []
        for run in range(runs):
            with tempfile.TemporaryDirectory(dir=".") as directory:
                outbox = Outbox(
                    Path(directory) / "outbox.sqlite",
                    max_items=items + 1,
                    synchronous=synchronous,
                )
                costs = []
                for n in range(items):
                    started = time.perf_counter()
                    outbox.put(_item(f"r{n}", payload))
                    costs.append(time.perf_counter() - started)
                outbox.close()
            median_us = statistics.median(costs) * 1e6
            per_run.append(median_us)
            _print({"synchronous": synchronous, "run": run, "items": items, "median_us": median_us})
        medians[synchronous] = statistics.median(per_run)
    return medians


async def measure_drain(items: int, runs: int, rate: float) -> float:
    import grpc

    from hybridmesh.common.v1 import routing_pb2
    from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
    from localmesh.launcher import LocalMesh, MeshOptions
    from router_service.escalation import EscalationClassifier, latest_policy
    from router_service.features import router_features
    from services.classification import softmax
    from services.views import apply_view
    from workload.fashion_mnist import load_split

    images = load_split("test").images[:2000]
    edge_logits = _edge_logits(images)
    classifier = EscalationClassifier(latest_policy(REPO / "models/policies/fashion-mnist"))
    # The policy's test-time views (services.views), as the router asks the edge for them.
    views = {
        view: softmax(_edge_logits(apply_view(view, images))) for view in classifier.metadata.views
    }
    scores = classifier.score(router_features(softmax(edge_logits), images, views))
    hard = [int(i) for i in np.flatnonzero(scores >= classifier.threshold)]
    with tempfile.TemporaryDirectory() as state_dir:
        mesh = LocalMesh(
            MeshOptions(
                state_dir=Path(state_dir),
                repository_root=REPO,
                random_ports=True,
                log_level="warning",
                router_environment={
                    "HYBRIDMESH_ROUTER_DRAIN_RATE_PER_S": str(rate),
                    "HYBRIDMESH_ROUTER_DRAIN_RATE_MIN_PER_S": str(rate),
                    "HYBRIDMESH_ROUTER_DRAIN_RATE_MAX_PER_S": str(rate),
                    "HYBRIDMESH_ROUTER_DRAIN_BATCH": "64",
                    "HYBRIDMESH_ROUTER_DRAIN_IDLE_S": "0.05",
                    "HYBRIDMESH_ROUTER_DRAIN_BACKOFF_BASE_S": "0.2",
                    "HYBRIDMESH_ROUTER_DRAIN_BACKOFF_MAX_S": "1",
                },
            )
        )
        state = await mesh.up()
        rates = []
        try:
            async with grpc.aio.insecure_channel(state.endpoints["router"]) as channel:
                stub = router_service_pb2_grpc.RouterServiceStub(channel)
                for run in range(runs):
                    await mesh.kill("cloud")
                    ids = [f"drain-{run}-{n}" for n in range(items)]
                    for n, request_id in enumerate(ids):
                        index = hard[n % len(hard)]
                        reply = await stub.Infer(
                            router_service_pb2.InferRequest(
                                request_id=request_id,
                                model="fashion-mnist",
                                inputs=[encode_tensor("image", images[index : index + 1])],
                                hints=routing_pb2.RoutingHints(
                                    privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC
                                ),
                            ),
                            timeout=5,
                        )
                        if not reply.decision.queued_for_reconciliation:
                            raise RuntimeError(f"{request_id} was not queued")
                    await mesh.restart("cloud")
                    times = await _reconciled_times(Path(state.outbox), ids)
                    per_s = (len(times) - 1) / (max(times) - min(times))
                    rates.append(per_s)
                    _print({"run": run, "items": items, "limit_per_s": rate, "drain_per_s": per_s})
        finally:
            await mesh.down()
    return statistics.median(rates)


def _edge_logits(images: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    import onnxruntime as ort

    session = ort.InferenceSession(str(REPO / "models/store/fashion-edge/1/model.onnx"))
    (logits,) = session.run(["logits"], {"image": images})
    return np.asarray(logits, dtype=np.float32)


async def _reconciled_times(path: Path, ids: list[str], timeout_s: float = 120) -> list[float]:
    deadline = time.monotonic() + timeout_s
    marks = ",".join("?" * len(ids))
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            rows = db.execute(
                f"SELECT reconciled_at FROM reconciled WHERE request_id IN ({marks})",
                ids,
            ).fetchall()
        if len(rows) == len(ids):
            return [row[0] for row in rows]
        await asyncio.sleep(0.05)
    raise TimeoutError("the outbox did not drain")


def _print(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    write = sub.add_parser("write")
    write.add_argument("--items", type=int, default=2000)
    write.add_argument("--runs", type=int, default=5)
    drain = sub.add_parser("drain")
    drain.add_argument("--items", type=int, default=200)
    drain.add_argument("--runs", type=int, default=3)
    drain.add_argument("--rate", type=float, default=500.0)
    costs = sub.add_parser("costs")
    costs.add_argument("--runs", type=int, default=3)
    costs.add_argument("--depths", type=int, nargs="+", default=[0, 5_000, 50_000])
    costs.add_argument("--escalations", type=int, default=400)
    costs.add_argument("--backlog", type=int, default=5_000)
    costs.add_argument("--load-per-s", type=float, default=20.0)
    costs.add_argument("--before-s", type=float, default=15.0)
    costs.add_argument(
        "--router-env", nargs="*", default=[], metavar="NAME=VALUE",
        help="extra HYBRIDMESH_ROUTER_* settings, e.g. a fixed drain rate to compare",
    )  # fmt: skip
    costs.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.what == "write":
        _print({"median_us_per_item": measure_write(args.items, args.runs)})
    elif args.what == "drain":
        _print({"median_drain_per_s": asyncio.run(measure_drain(args.items, args.runs, args.rate))})
    else:
        from bench.outbox_costs import Options, run

        environment = dict(pair.split("=", 1) for pair in args.router_env)
        options = Options(
            runs=args.runs,
            depths=args.depths,
            escalations=args.escalations,
            backlog=args.backlog,
            load_per_s=args.load_per_s,
            before_s=args.before_s,
            router_environment=environment,
        )
        run(options, args.out)


if __name__ == "__main__":
    main()
