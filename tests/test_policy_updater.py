"""Router policy over-the-air: the committed policy and versions derived from it, through
a real registry store, real signatures and real onnxruntime sessions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ota.artifacts import ArtifactRef
from ota.signatures import load_trusted_keys
from registry.signing import generate_key
from registry.store import RegistryStore, StoreSource
from router_service.escalation import EscalationClassifier, ScoringPolicy
from router_service.policy_updater import POLICY_KIND, PolicyUpdater

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "models" / "policies" / "fashion-mnist" / "1"
PAIR = "fashion-mnist"


class Router:
    """Stands in for the router's reference to one pair's policy (the updater's only
    contact)."""

    def __init__(self, classifier: ScoringPolicy) -> None:
        self.classifier = classifier

    def install(self, classifier: ScoringPolicy) -> None:
        self.classifier = classifier


@dataclass
class PolicySite:
    router: Router
    updater: PolicyUpdater
    policy_root: Path
    publish: Callable[..., Path]
    restart: Callable[[], PolicyUpdater]  # a new updater on the same disk: a router restart


@pytest.fixture
def site(tmp_path: Path) -> PolicySite:
    key = generate_key(tmp_path / "operator")
    store = RegistryStore(tmp_path / "registry")
    policy_root = tmp_path / "policies" / PAIR
    shutil.copytree(COMMITTED, policy_root / "1")
    router = Router(EscalationClassifier(policy_root / "1"))

    def new_updater() -> PolicyUpdater:
        return PolicyUpdater(
            StoreSource(store),
            PAIR,
            policy_root,
            tmp_path / "staging",
            load_trusted_keys([tmp_path / "operator" / "publisher.pub"]),
            lambda: router.classifier,
            router.install,
        )

    def publish(version: int, **changes: Any) -> Path:
        source = tmp_path / "publisher" / str(version)
        shutil.copytree(COMMITTED, source)
        metadata = json.loads((source / "policy.json").read_text())
        metadata.update({"version": str(version), **changes})
        (source / "policy.json").write_text(json.dumps(metadata))
        store.publish(source, ArtifactRef(POLICY_KIND, PAIR, version), key)
        store.promote(POLICY_KIND, PAIR, version, key)
        return store.root / POLICY_KIND / PAIR / str(version)

    return PolicySite(router, new_updater(), policy_root, publish, new_updater)


async def test_a_promoted_policy_is_verified_and_swapped_in(site: PolicySite) -> None:
    router, updater = site.router, site.updater
    assert await updater.poll_once() is None, "nothing promoted yet"
    site.publish(2)
    update = await updater.poll_once()
    assert update is not None
    assert (update.outcome, update.version, update.previous_version) == ("switched", 2, "1")
    assert router.classifier.version == "2"
    assert await updater.poll_once() is None, "already serving the promoted version"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"pair": "other-pair"}, "pair"),
        ({"threshold": 1.5}, "threshold"),
        ({"feature_names": ["a", "b"]}, "feature names"),
        ({"classifier_sha256": "0" * 64}, "does not load"),
    ],
)
async def test_an_incompatible_policy_is_refused_and_not_retried(
    site: PolicySite, changes: dict[str, Any], reason: str
) -> None:
    site.publish(2, **changes)
    update = await site.updater.poll_once()
    assert update is not None and update.outcome == "refused", update
    assert reason in update.reason
    assert site.router.classifier.version == "1"
    assert not (site.policy_root / "2").exists()
    assert await site.updater.poll_once() is None


async def test_a_tampered_policy_file_is_refused(site: PolicySite) -> None:
    stored = site.publish(2)
    classifier = stored / "classifier.onnx"
    classifier.write_bytes(classifier.read_bytes() + b"\0")
    update = await site.updater.poll_once()
    assert update is not None and update.outcome == "refused"
    assert "verification failed" in update.reason
    assert site.router.classifier.version == "1"


async def test_a_refused_policy_is_still_refused_after_a_restart(site: PolicySite) -> None:
    site.publish(2, threshold=1.5)
    update = await site.updater.poll_once()
    assert update is not None and update.outcome == "refused"
    restarted = site.restart()
    assert restarted.refused.of(PAIR) == (2,)
    assert await restarted.poll_once() is None, "a refused version is not fetched again"
    assert site.router.classifier.version == "1"
    site.publish(3)
    update = await restarted.poll_once()
    assert update is not None and (update.outcome, update.version) == ("switched", 3)
