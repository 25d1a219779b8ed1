"""A site's first start from the manifests alone (issue 20): the model store volume starts
empty, so the edge node seeds it from the store shipped in the image, or fetches the
promoted version from the registry, then serves; an empty or refused store never stops it
from polling the registry. The router's policy roots are seeded by the same rule."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.app import EdgeNode
from ota.artifacts import ArtifactRef
from ota.seed import seed_versions
from registry.app import RegistryNode
from registry.config import RegistrySettings
from registry.signing import PublisherKey, generate_key
from services.access_rules import site_identity
from services.telemetry import create_telemetry
from tests.helpers.credentials import Credentials, make_credentials
from tests.helpers.edge_node import edge_settings
from tests.helpers.ota_site import golden_set, make_version
from tests.helpers.paths import EDGE_MODEL, SERVED_POLICY_VERSION, STORE
from tests.helpers.scripted_tiers import scripted_mesh
from tests.helpers.waiting import eventually
from workload.model_store import versions

POLICIES = Path(__file__).resolve().parent.parent / "models" / "policies"


def test_an_empty_root_gets_the_newest_seed_version_of_each_wanted_name(tmp_path: Path) -> None:
    seed = tmp_path / "image"
    shutil.copytree(STORE / EDGE_MODEL / "1", seed / EDGE_MODEL / "1")
    shutil.copytree(STORE / EDGE_MODEL / "1", seed / EDGE_MODEL / "2")
    shutil.copytree(STORE / "fashion-cloud" / "1", seed / "fashion-cloud" / "1")
    root = tmp_path / "volume" / "store"

    seeded = seed_versions(seed, root, [EDGE_MODEL])

    assert seeded == [root / EDGE_MODEL / "2"]
    assert versions(root / EDGE_MODEL) == [2]
    assert not (root / "fashion-cloud").exists()  # not served, not copied
    assert sorted(p.name for p in (root / EDGE_MODEL).iterdir()) == ["2"]  # no staging left


def test_a_name_with_any_version_on_the_volume_is_left_alone(tmp_path: Path) -> None:
    """An over-the-air update (or rollback) installed on the volume wins over the image."""
    seed = tmp_path / "image"
    shutil.copytree(STORE / EDGE_MODEL / "1", seed / EDGE_MODEL / "3")
    root = tmp_path / "store"
    shutil.copytree(STORE / EDGE_MODEL / "1", root / EDGE_MODEL / "1")

    assert seed_versions(seed, root, [EDGE_MODEL]) == []
    assert versions(root / EDGE_MODEL) == [1]
    assert seed_versions(tmp_path / "no-such-seed", root) == []


def test_an_interrupted_seed_is_cleaned_and_redone(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    (root / "fashion-mnist" / ".seed-abc").mkdir(parents=True)  # a crash mid-copy

    seeded = seed_versions(POLICIES, root)

    # The newest version of the image's seed (the one the router serves), nothing else.
    assert seeded == [root / "fashion-mnist" / SERVED_POLICY_VERSION]
    assert [p.name for p in (root / "fashion-mnist").iterdir()] == [SERVED_POLICY_VERSION]


async def _health(node: EdgeNode) -> int:
    async with grpc.aio.insecure_channel(node.host.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


async def test_an_empty_store_is_seeded_from_the_image_then_serving(tmp_path: Path) -> None:
    store = tmp_path / "volume" / "store"  # the volume is mounted; the store is not there
    node = EdgeNode(
        edge_settings(model_store=store, seed_store=STORE),
        create_telemetry("t", export_otlp=False),
    )
    await node.start()
    try:
        assert node.ready
        assert await _health(node) == health_pb2.HealthCheckResponse.SERVING
        assert versions(store / EDGE_MODEL) == [1]
        assert not (store / "fashion-cloud").exists()  # only the served models
    finally:
        await node.stop(0)


@dataclass
class Registry:
    node: RegistryNode
    key: PublisherKey
    root: Path
    credentials: Credentials

    def publish(self, version: int) -> None:
        directory = make_version(self.root / "publisher-store", version)
        self.node.store.publish(directory, ArtifactRef("model", EDGE_MODEL, version), self.key)
        self.node.store.promote("model", EDGE_MODEL, version, self.key)

    def edge(self, store: Path, **overrides: object) -> EdgeNode:
        golden = self.root / "golden.npz"
        if not golden.exists():
            golden_set().save(golden)
        settings = edge_settings(
            model_store=store,
            registry_target=self.node.host.address,
            trusted_keys=(self.root / "operator" / "publisher.pub",),
            golden_set=golden,
            update_staging=self.root / "staging",
            update_interval_s=0.2,
            # The site's own credential: the registry trusts no caller without one.
            registry_token_file=self.credentials.token_file(site_identity("site-local")),
            **overrides,
        )
        return EdgeNode(settings, create_telemetry("t", export_otlp=False))


@pytest_asyncio.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    credentials = make_credentials(tmp_path / "credentials")
    node = RegistryNode(
        RegistrySettings(
            port=0,
            root=tmp_path / "registry",
            shutdown_grace_seconds=0,
            token_sha256=credentials.hashes(),
        ),
        create_telemetry("registry", export_otlp=False),
    )
    await node.start()
    shutil.copytree(STORE / EDGE_MODEL / "1", tmp_path / "publisher-store" / EDGE_MODEL / "1")
    try:
        yield Registry(node, generate_key(tmp_path / "operator"), tmp_path, credentials)
    finally:
        await node.stop(0)


async def test_an_empty_store_without_a_seed_fetches_the_promoted_version(
    registry: Registry, tmp_path: Path
) -> None:
    """Nothing in the image's store, nothing promoted yet: NOT_SERVING and polling; once
    promoted, fetched, verified, then SERVING."""
    store = tmp_path / "store"
    node = registry.edge(store, seed_store=tmp_path / "empty-image-store")
    await node.start()
    try:
        # It has looked at its store and refused it.
        await eventually(lambda: "model store refused" in (node._not_ready_reason or ""))
        assert not node.ready
        assert node._updates is not None and not node._updates.done()
        assert "model store refused" in node._not_ready_reason
        assert await _health(node) == health_pb2.HealthCheckResponse.NOT_SERVING
        registry.publish(2)
        await eventually(lambda: node.ready, timeout_s=20)
        assert await _health(node) == health_pb2.HealthCheckResponse.SERVING
        assert node.models is not None
        assert node.models.resolve_name(EDGE_MODEL).version == "2"
        assert node.updater is not None  # from now on, canaried updates as usual
    finally:
        await node.stop(0)


async def test_a_refused_store_still_polls_and_a_promoted_version_repairs_it(
    registry: Registry, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(STORE / EDGE_MODEL / "1", store / EDGE_MODEL / "1")
    model_file = store / EDGE_MODEL / "1" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-1] + b"\x00")  # fails its sha256
    polled: list[int] = []
    original = registry.node.store.summaries

    def counting() -> Any:  # every poll lists the registry's artifacts
        polled.append(1)
        return original()

    registry.node.store.summaries = counting  # type: ignore[method-assign]
    node = registry.edge(store)
    await node.start()
    try:
        assert not node.ready
        assert "sha256" in node._not_ready_reason
        await eventually(lambda: len(polled) >= 2, timeout_s=20)  # polling although nothing loaded
        assert not node.ready
        registry.publish(2)
        await eventually(lambda: node.ready, timeout_s=20)
        assert node.models is not None
        assert node.models.resolve_name(EDGE_MODEL).version == "2"
    finally:
        await node.stop(0)


async def test_the_router_seeds_its_pairs_policy_roots_from_the_image(tmp_path: Path) -> None:
    volume = tmp_path / "policies"
    async with scripted_mesh(tmp_path, policies_dir=volume, policies_seed=POLICIES) as mesh:
        assert versions(volume / "fashion-mnist") == [int(SERVED_POLICY_VERSION)]
        assert mesh.router.router.policies["fashion-mnist"].version == SERVED_POLICY_VERSION
