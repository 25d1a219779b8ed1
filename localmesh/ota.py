"""Over-the-air updates in the local mesh: an operator key, a registry holding every
catalog pair's edge model and router policy (signed, promoted), and the site's own copies
of them, so updates change the mesh's state directory and never the repository. A pair
without a policy is published without one: its router serves the max-softmax default."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_node.canary import GOLDEN_FILE, GoldenSet
from ota.artifacts import ArtifactRef
from registry.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_key, load_private_key
from registry.store import RegistryStore
from router_service.escalation import PolicyArtifactError, latest_policy
from router_service.policy_updater import POLICY_KIND
from workload.catalog import load_catalog
from workload.fashion_mnist import golden_split
from workload.model_store import latest_versions


@dataclass(frozen=True)
class ModelSources:
    """Where the mesh's pairs come from: the catalog, the model store, the policy root
    (``<policies>/<pair>/<version>/``)."""

    catalog: Path
    store: Path
    policies: Path

    @classmethod
    def of_repository(cls, root: Path) -> ModelSources:
        return cls(root / "models/catalog.toml", root / "models/store", root / "models/policies")

    def resolved(self) -> ModelSources:
        """Absolute paths: the parts run with the repository as working directory."""
        return ModelSources(self.catalog.resolve(), self.store.resolve(), self.policies.resolve())

    def edge_models(self) -> list[str]:
        return sorted({pair.edge_model for pair in load_catalog(self.catalog).values()})


@dataclass(frozen=True)
class SiteArtifacts:
    registry_root: Path
    trusted_key: Path
    edge_store: Path
    golden_set: Path
    # One policy root per pair under it: <policies_dir>/<pair>/<version>/.
    policies_dir: Path
    staging: Path


def prepare(state_dir: Path, sources: ModelSources) -> SiteArtifacts:
    """Idempotent: what exists (a key, published versions, an updated store) is kept."""
    keys = state_dir / "operator"
    key = (
        load_private_key(keys / PRIVATE_KEY_FILE)
        if (keys / PRIVATE_KEY_FILE).exists()
        else generate_key(keys)
    )
    store = RegistryStore(state_dir / "registry")
    edge_models = sources.edge_models()
    committed_models = {
        d.parent.name: d for d in latest_versions(sources.store) if d.parent.name in edge_models
    }
    committed_policies = {}
    for pair in load_catalog(sources.catalog):
        try:
            committed_policies[pair] = latest_policy(sources.policies / pair)
        except PolicyArtifactError:
            continue  # served with the max-softmax default until one is published
    artifacts = [(d, "model", name) for name, d in committed_models.items()]
    artifacts += [(d, POLICY_KIND, pair) for pair, d in committed_policies.items()]
    for directory, kind, name in artifacts:
        ref = ArtifactRef(kind, name, int(directory.name))
        if ref.version not in store.versions(kind, name):
            store.publish(directory, ref, key)
        if store.promoted(kind, name) is None:
            store.promote(kind, name, ref.version)
    site = state_dir / "site"
    edge_store = site / "models"
    for name, directory in committed_models.items():
        if not (edge_store / name).exists():
            shutil.copytree(directory, edge_store / name / directory.name)
    policies_dir = site / "policies"
    for pair, directory in committed_policies.items():
        if not (policies_dir / pair).exists():
            shutil.copytree(directory, policies_dir / pair / directory.name)
    golden = site / GOLDEN_FILE
    if not golden.exists():
        GoldenSet.of(golden_split()).save(golden)
    return SiteArtifacts(
        store.root, keys / PUBLIC_KEY_FILE, edge_store, golden, policies_dir, site / "updates"
    )
