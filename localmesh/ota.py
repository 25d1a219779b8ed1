"""Over-the-air updates in the local mesh: an operator key, a registry holding the
committed edge model and router policy (signed, promoted), and the site's own copies of
both, so updates change the mesh's state directory and never the repository."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_node.canary import GOLDEN_FILE, GoldenSet
from ota.artifacts import ArtifactRef
from registry.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_key, load_private_key
from registry.store import RegistryStore
from router_service.escalation import latest_policy
from router_service.policy_updater import POLICY_KIND
from workload.fashion_mnist import golden_split
from workload.model_store import latest_versions

EDGE_MODEL = "fashion-edge"
PAIR = "fashion-mnist"


@dataclass(frozen=True)
class SiteArtifacts:
    registry_root: Path
    trusted_key: Path
    edge_store: Path
    golden_set: Path
    policy_root: Path
    staging: Path


def prepare(state_dir: Path, repository_root: Path) -> SiteArtifacts:
    """Idempotent: what exists (a key, published versions, an updated store) is kept."""
    keys = state_dir / "operator"
    key = (
        load_private_key(keys / PRIVATE_KEY_FILE)
        if (keys / PRIVATE_KEY_FILE).exists()
        else generate_key(keys)
    )
    store = RegistryStore(state_dir / "registry")
    committed_model = next(
        d for d in latest_versions(repository_root / "models/store") if d.parent.name == EDGE_MODEL
    )
    committed_policy = latest_policy(repository_root / "models/policies" / PAIR)
    for directory, kind, name in (
        (committed_model, "model", EDGE_MODEL),
        (committed_policy, POLICY_KIND, PAIR),
    ):
        ref = ArtifactRef(kind, name, int(directory.name))
        if ref.version not in store.versions(kind, name):
            store.publish(directory, ref, key)
        if store.promoted(kind, name) is None:
            store.promote(kind, name, ref.version)
    site = state_dir / "site"
    edge_store = site / "models"
    if not edge_store.exists():
        shutil.copytree(committed_model, edge_store / EDGE_MODEL / committed_model.name)
    policy_root = site / "policies" / PAIR
    if not policy_root.exists():
        shutil.copytree(committed_policy, policy_root / committed_policy.name)
    golden = site / GOLDEN_FILE
    if not golden.exists():
        GoldenSet.of(golden_split()).save(golden)
    return SiteArtifacts(
        store.root, keys / PUBLIC_KEY_FILE, edge_store, golden, policy_root, site / "updates"
    )
