"""Over-the-air updates in the local mesh: an operator key, a registry holding every
catalog pair's edge model and router policy (signed, promoted), the site's own copies of
them, so updates change the mesh's state directory and never the repository (a pair
without a policy is published without one: its router serves the max-softmax default);
and the control plane's credentials (``<state>/credentials``): a bearer token for the
operator and one for the site (0600), and the sha256 hashes the registry and the edge
node's admin service check them against (``services.access_rules``,
``docs/threat-model.md``)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_node.canary import GOLDEN_FILE, GoldenSet
from ota.artifacts import ArtifactRef
from registry.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_key, load_private_key
from registry.store import RegistryStore
from router_service.escalation import PolicyArtifactError, latest_policy
from router_service.policy_updater import POLICY_KIND
from services.access_rules import OPERATOR, site_identity
from services.auth import token_sha256
from workload.catalog import load_catalog
from workload.fashion_mnist import golden_split
from workload.model_store import latest_versions

SITE = "site-local"  # the local mesh's one edge site


@dataclass(frozen=True)
class Credentials:
    """The control plane's credentials in the local mesh (all under one directory)."""

    directory: Path

    @property
    def operator_token(self) -> Path:
        return self.directory / "operator.token"

    @property
    def site_token(self) -> Path:
        return self.directory / f"{SITE}.token"

    @property
    def registry_tokens(self) -> Path:
        """SPIFFE id -> token sha256 of everyone the registry knows (operator, site)."""
        return self.directory / "registry-tokens.json"

    @property
    def edge_admin_tokens(self) -> Path:
        """The same for the edge node's admin service (which only the operator may call;
        the site is known, to be told PERMISSION_DENIED)."""
        return self.directory / "edge-admin-tokens.json"


def _secret_file(path: Path) -> str:
    """The token in ``path``, created (0600 from the start) when missing."""
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(token + "\n")
    return token


def ensure_credentials(state_dir: Path) -> Credentials:
    """Idempotent: existing tokens are kept; the hash files are rewritten from them."""
    credentials = Credentials(state_dir / "credentials")
    credentials.directory.mkdir(parents=True, exist_ok=True)
    credentials.directory.chmod(0o700)
    operator = token_sha256(_secret_file(credentials.operator_token))
    site = token_sha256(_secret_file(credentials.site_token))
    registry = {OPERATOR.spiffe_id: operator, site_identity(SITE).spiffe_id: site}
    credentials.registry_tokens.write_text(json.dumps(registry, indent=1) + "\n")
    credentials.edge_admin_tokens.write_text(json.dumps(registry, indent=1) + "\n")
    return credentials


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
    operator_keys: Path
    credentials: Credentials


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
        if store.promotion(kind, name) is None:
            # A state directory from before signed promotions gets its first statement.
            store.promote(kind, name, store.promoted(kind, name) or ref.version, key)
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
        store.root,
        keys / PUBLIC_KEY_FILE,
        edge_store,
        golden,
        policies_dir,
        site / "updates",
        keys,
        ensure_credentials(state_dir),
    )
