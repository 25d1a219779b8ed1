"""A router process swaps its escalation policy over the air: a new signed policy version
promoted in a real registry (gRPC) is picked up, verified and serves the next request.

The router, the edge node and the registry are real gRPC servers; the cloud is a server
with only grpc.health.v1, because these requests are kept on the edge (the policy swap,
not escalation, is under test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from edge_node.app import EdgeNode
from hybridmesh.router.v1 import router_service_pb2_grpc
from ota.artifacts import ArtifactRef
from registry.app import RegistryNode
from registry.config import RegistrySettings
from registry.signing import generate_key
from router_service.app import RouterNode, pairs_from_catalog
from router_service.policy_updater import POLICY_KIND
from services.access_rules import site_identity
from services.telemetry import create_telemetry
from tests.helpers.credentials import make_credentials
from tests.helpers.edge_node import edge_settings
from tests.helpers.item_difficulty import easy_and_hard
from tests.helpers.requests import router_request
from tests.helpers.router_node import router_settings
from tests.helpers.scripted_tiers import start_health_only_cloud
from tests.helpers.waiting import eventually
from workload.fashion_mnist import load_split

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "models" / "policies" / "fashion-mnist" / "1"
PAIR = "fashion-mnist"
IMAGES = load_split("test").images[:200]
EASY, _ = easy_and_hard(IMAGES, 1)


async def test_a_promoted_policy_serves_the_next_request(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "operator")
    credentials = make_credentials(tmp_path / "credentials")
    registry = RegistryNode(
        RegistrySettings(
            port=0,
            root=tmp_path / "registry",
            shutdown_grace_seconds=0,
            token_sha256=credentials.hashes(),
        ),
        create_telemetry("registry", metric_readers=[InMemoryMetricReader()], export_otlp=False),
    )
    await registry.start()
    registry.store.publish(COMMITTED, ArtifactRef(POLICY_KIND, PAIR, 1), key)
    registry.store.promote(POLICY_KIND, PAIR, 1, key)
    edge = EdgeNode(edge_settings(), create_telemetry("edge", export_otlp=False))
    await edge.start()
    cloud = await start_health_only_cloud()
    policy_root = tmp_path / "policies" / PAIR
    shutil.copytree(COMMITTED, policy_root / "1")
    settings = router_settings(
        edge.host.address,
        cloud.address,
        policies_dir=policy_root.parent,
        registry_target=registry.host.address,
        registry_token_file=credentials.token_file(site_identity("site-local")),
        trusted_keys=(tmp_path / "operator" / "publisher.pub",),
        policy_update_staging=tmp_path / "staging",
        policy_update_interval_s=0.1,
    )
    router = RouterNode(
        settings,
        create_telemetry("router", export_otlp=False),
        pairs_from_catalog(settings.catalog),
    )
    await router.start()
    channel = grpc.aio.insecure_channel(router.host.address)
    try:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        await eventually(lambda: router.tier_up["edge"])
        request = router_request(IMAGES[EASY[0] : EASY[0] + 1])
        before = await stub.Infer(request, timeout=5)
        source = tmp_path / "publisher" / "2"
        shutil.copytree(COMMITTED, source)
        metadata = json.loads((source / "policy.json").read_text())
        (source / "policy.json").write_text(json.dumps({**metadata, "version": "2"}))
        registry.store.publish(source, ArtifactRef(POLICY_KIND, PAIR, 2), key)
        registry.store.promote(POLICY_KIND, PAIR, 2, key)
        await eventually(lambda: router.router.policies[PAIR].version == "2")
        after = await stub.Infer(request, timeout=5)
    finally:
        await channel.close(None)
        await router.stop(0)
        await cloud.stop(0)
        await edge.stop(0)
        await registry.stop(0)
    assert before.decision.policy_version == "1"
    assert after.decision.policy_version == "2"
    assert (policy_root / "2" / "policy.json").exists(), "installed beside the old version"
