"""Over-the-air update fixtures: a registry with the operator's key, edge model versions
made from the committed one (an identical v2, a deliberately worse v3), a golden set."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edge_node.canary import GoldenSet
from ota.artifacts import ArtifactRef
from registry.signing import PublisherKey, generate_key
from registry.store import RegistryStore
from tests.helpers.paths import EDGE_MODEL, STORE
from workload.fashion_mnist import golden_split
from workload.model_store import derive_version

# The committed store, which every version here derives from.
COMMITTED_STORE = STORE


def golden_set() -> GoldenSet:
    return GoldenSet.of(golden_split())


def worse_model_bytes(seed: int = 7, noise: float = 0.2) -> bytes:
    """The committed edge model with noise of ``noise`` x each weight tensor's spread
    added: it still loads and answers, but worse (a deliberately bad update)."""
    model = onnx.load(str(COMMITTED_STORE / EDGE_MODEL / "1" / "model.onnx"))
    generator = np.random.default_rng(seed)
    for initializer in model.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.dtype != np.float32 or weights.size < 16:
            continue
        noisy = weights + generator.normal(0, noise * float(weights.std()), weights.shape)
        initializer.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), initializer.name))
    return model.SerializeToString()


def make_version(publisher_store: Path, version: int, model_bytes: bytes | None = None) -> Path:
    """A new store version of the edge model (same contract), written as the store does."""
    return derive_version(COMMITTED_STORE / EDGE_MODEL / "1", publisher_store, version, model_bytes)


@dataclasses.dataclass
class Site:
    """The cloud's registry and one edge site's model store."""

    registry: RegistryStore
    key: PublisherKey
    public_key: Path
    edge_store: Path
    staging: Path
    publisher_store: Path

    def publish(self, version: int, model_bytes: bytes | None = None, promote: bool = True) -> None:
        directory = (
            COMMITTED_STORE / EDGE_MODEL / "1"
            if version == 1
            else make_version(self.publisher_store, version, model_bytes)
        )
        self.registry.publish(directory, ArtifactRef("model", EDGE_MODEL, version), self.key)
        if promote:
            self.registry.promote("model", EDGE_MODEL, version, self.key)


def make_site(root: Path) -> Site:
    key = generate_key(root / "operator")
    edge_store = root / "edge-store"
    shutil.copytree(COMMITTED_STORE / EDGE_MODEL / "1", edge_store / EDGE_MODEL / "1")
    publisher_store = root / "publisher-store"
    shutil.copytree(COMMITTED_STORE / EDGE_MODEL / "1", publisher_store / EDGE_MODEL / "1")
    site = Site(
        RegistryStore(root / "registry"),
        key,
        root / "operator" / "publisher.pub",
        edge_store,
        root / "edge-staging",
        publisher_store,
    )
    site.publish(1)
    return site
