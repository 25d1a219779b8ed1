"""Over-the-air update time for the committed edge model, step by step.

A registry process and an edge node process on loopback; each round publishes a new
version of the edge model (the committed weights, a new version number), promotes it and
asks the edge node to check now. The edge node's own step timings (download, verify,
load, canary on its golden set, switch) and the whole CheckForUpdates round trip are
reported as medians.
``python -m bench.ota_bench --rounds 10 --out results/ota_bench.json``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.load import ServerProcess, publish_report
from edge_node.canary import GoldenSet
from hybridmesh.edge.v1 import edge_admin_pb2, edge_admin_pb2_grpc
from hybridmesh.registry.v1 import registry_service_pb2 as pb
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from localmesh.ota import ensure_credentials
from ota.artifacts import ArtifactRef
from registry.signing import generate_key, sign_promotion
from registry.store import RegistryStore
from services.auth import bearer_metadata, read_token
from workload.fashion_mnist import GOLDEN_SIZE, golden_split
from workload.model_store import derive_version

REPO_ROOT = Path(__file__).resolve().parent.parent
EDGE_MODEL = "fashion-edge"
COMMITTED = REPO_ROOT / "models" / "store" / EDGE_MODEL / "1"
STEPS = ("download", "verify", "load", "canary", "switch", "check_round_trip")


async def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    key = generate_key(directory / "operator")
    store = RegistryStore(directory / "registry")
    store.publish(COMMITTED, ArtifactRef("model", EDGE_MODEL, 1), key)
    store.promote("model", EDGE_MODEL, 1, key)
    edge_store = directory / "edge" / "store"
    shutil.copytree(COMMITTED, edge_store / EDGE_MODEL / "1")
    shutil.copytree(COMMITTED, directory / "publisher" / EDGE_MODEL / "1")
    GoldenSet.of(golden_split()).save(directory / "edge" / "golden.npz")
    # The control plane as the local mesh runs it: the operator promotes with a bearer
    # token and a signed statement, the edge site fetches with its own token.
    credentials = ensure_credentials(directory)
    operator = bearer_metadata(read_token(credentials.operator_token))
    trusted = json.dumps([str(directory / "operator/publisher.pub")])
    registry = ServerProcess(
        ["-m", "registry"],
        env={
            "HYBRIDMESH_REGISTRY_PORT": "{port}",
            "HYBRIDMESH_REGISTRY_ROOT": str(store.root),
            "HYBRIDMESH_REGISTRY_LOG_LEVEL": "warning",
            "HYBRIDMESH_REGISTRY_TOKENS_FILE": str(credentials.registry_tokens),
            "HYBRIDMESH_REGISTRY_TRUSTED_KEYS": trusted,
        },
    )
    await registry.wait_serving()
    edge = ServerProcess(
        ["-m", "edge_node"],
        env={
            "HYBRIDMESH_EDGE_PORT": "{port}",
            "HYBRIDMESH_EDGE_MODEL_STORE": str(edge_store),
            "HYBRIDMESH_EDGE_SERVED_MODELS": json.dumps([EDGE_MODEL]),
            "HYBRIDMESH_EDGE_REGISTRY_TARGET": registry.address,
            "HYBRIDMESH_EDGE_TRUSTED_KEYS": trusted,
            "HYBRIDMESH_EDGE_REGISTRY_TOKEN_FILE": str(credentials.site_token),
            "HYBRIDMESH_EDGE_ADMIN_TOKENS_FILE": str(credentials.edge_admin_tokens),
            "HYBRIDMESH_EDGE_GOLDEN_SET": str(directory / "edge" / "golden.npz"),
            "HYBRIDMESH_EDGE_UPDATE_STAGING": str(directory / "edge" / "staging"),
            "HYBRIDMESH_EDGE_UPDATE_INTERVAL_S": "3600",
            "HYBRIDMESH_EDGE_LOG_LEVEL": "warning",
        },
    )
    rounds: list[dict[str, float]] = []
    try:
        await edge.wait_serving()
        async with (
            grpc.aio.insecure_channel(registry.address) as registry_channel,
            grpc.aio.insecure_channel(edge.address) as edge_channel,
        ):
            promote = registry_service_pb2_grpc.RegistryServiceStub(registry_channel).Promote
            check = edge_admin_pb2_grpc.EdgeAdminServiceStub(edge_channel).CheckForUpdates
            for version in range(2, args.rounds + 2):
                source = derive_version(COMMITTED, directory / "publisher", version)
                store.publish(source, ArtifactRef("model", EDGE_MODEL, version), key)
                ref = pb.ArtifactRef(kind=pb.ARTIFACT_KIND_MODEL, name=EDGE_MODEL, version=version)
                # Version 1 was promoted with sequence 1 (store.promote); each round's next.
                signed = sign_promotion(key, "model", EDGE_MODEL, version, version, "promote")
                promotion = pb.SignedPromotion(
                    statement=signed.statement, signature=signed.signature
                )
                request = pb.PromoteRequest(artifact=ref, promotion=promotion)
                await promote(request, timeout=10, metadata=operator)
                started = time.perf_counter()
                reply = await check(
                    edge_admin_pb2.CheckForUpdatesRequest(), timeout=60, metadata=operator
                )
                total_ms = (time.perf_counter() - started) * 1e3
                (event,) = reply.events
                if event.outcome != "switched":
                    raise RuntimeError(f"round {version}: {event.outcome} {event.reason}")
                rounds.append({**dict(event.timings_ms), "check_round_trip": total_ms})
    finally:
        edge.stop()
        registry.stop()
    steps = [s for s in STEPS if s in rounds[0]]
    return {
        "settings": {"rounds": args.rounds, "golden_set": GOLDEN_SIZE},
        "artifact_bytes": sum(p.stat().st_size for p in COMMITTED.iterdir()),
        "median_ms": {step: statistics.median(r[step] for r in rounds) for step in steps},
        "rounds": rounds,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Update of the committed edge model ({report['artifact_bytes']:,} bytes), medians of "
        f"{report['settings']['rounds']} rounds, registry and edge node as processes on "
        f"loopback; canary on {report['settings']['golden_set']} golden images.",
        "",
        "| step | ms |",
        "| --- | --- |",
    ]
    lines += [f"| {step} | {value:.2f} |" for step, value in report["median_ms"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        report = asyncio.run(run(args, Path(temporary)))
    publish_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
