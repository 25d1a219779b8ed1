"""Issue 17 #1: one routing policy per catalog pair; a pair without one is served by the
explicit max-softmax default, named as such, never by another pair's policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hybridmesh.common.v1 import decision_pb2
from router_service.escalation import (
    DEFAULT_POLICY_VERSION,
    MAX_SOFTMAX,
    EscalationClassifier,
    MaxSoftmaxPolicy,
    PolicyArtifactError,
    load_pair_policies,
    load_policy,
)
from tests.helpers.scripted_tiers import CONFIDENT, HARD, request, scripted_mesh

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "models" / "policies" / "fashion-mnist" / "1"
SECOND = "fashion-mnist-b"


def two_pair_catalog(tmp_path: Path) -> Path:
    """The committed catalog plus a second pair on the same models (configuration only)."""
    text = (REPO / "models" / "catalog.toml").read_text()
    second = text[text.index("[pairs.fashion-mnist]") :].replace(
        "[pairs.fashion-mnist]", f"[pairs.{SECOND}]"
    )
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f"{text}\n{second}")
    return catalog


def test_a_pair_without_a_policy_gets_the_named_max_softmax_default(tmp_path: Path) -> None:
    shutil.copytree(COMMITTED, tmp_path / "fashion-mnist" / "1")
    policies = load_pair_policies(tmp_path, ["fashion-mnist", SECOND], 0.3)
    assert isinstance(policies["fashion-mnist"], EscalationClassifier)
    default = policies[SECOND]
    assert isinstance(default, MaxSoftmaxPolicy)
    assert default.version == DEFAULT_POLICY_VERSION and default.metadata.pair == SECOND
    # score = 1 - top-1 probability (the first feature).
    features = np.array([[0.9, 0.0], [0.4, 0.0]], dtype=np.float32)
    assert default.score(features).tolist() == pytest.approx([0.1, 0.6])


def test_another_pairs_policy_in_a_pairs_place_is_refused(tmp_path: Path) -> None:
    shutil.copytree(COMMITTED, tmp_path / SECOND / "1")  # says pair "fashion-mnist"
    with pytest.raises(PolicyArtifactError, match="not 'fashion-mnist-b'"):
        load_pair_policies(tmp_path, [SECOND], 0.3)


def test_a_max_softmax_artifact_loads_without_a_classifier(tmp_path: Path) -> None:
    directory = tmp_path / SECOND / "4"
    directory.mkdir(parents=True)
    raw = json.loads((COMMITTED / "policy.json").read_text())
    raw.update(kind=MAX_SOFTMAX, version="4", pair=SECOND, threshold=0.25)
    raw.pop("classifier_sha256")
    (directory / "policy.json").write_text(json.dumps(raw))
    policy = load_policy(directory)
    assert isinstance(policy, MaxSoftmaxPolicy) and policy.threshold == 0.25
    assert load_pair_policies(tmp_path, [SECOND], 0.3)[SECOND].version == "4"


async def test_each_decision_names_its_own_pairs_policy(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(COMMITTED, policies / "fashion-mnist" / "1")
    async with scripted_mesh(
        tmp_path, catalog=two_pair_catalog(tmp_path), policies_dir=policies
    ) as mesh:
        first = await mesh.stub.Infer(request([CONFIDENT], mesh, request_id="p1"), timeout=2)
        second = await mesh.stub.Infer(
            request([CONFIDENT], mesh, request_id="p2", pair=SECOND), timeout=2
        )
        hard = await mesh.stub.Infer(request([HARD], mesh, request_id="p3", pair=SECOND), timeout=2)
        assert first.decision.policy_version == "1"
        assert second.decision.policy_version == DEFAULT_POLICY_VERSION
        assert second.decision.threshold == pytest.approx(0.3)
        assert f"policy {DEFAULT_POLICY_VERSION}" in second.decision.explanation
        # The default still escalates what the edge is unsure of.
        assert hard.predictions[0].reason == decision_pb2.DECISION_REASON_ESCALATED_HARD_CASE

        # An update of one pair's policy leaves the other's as it is.
        router = mesh.router.router
        replacement = MaxSoftmaxPolicy.default(SECOND, 0.5)
        router.install_policy(SECOND, replacement)
        assert router.policies[SECOND] is replacement
        assert router.policies["fashion-mnist"].version == "1"
        with pytest.raises(ValueError, match="cannot serve"):
            router.install_policy("fashion-mnist", replacement)


async def test_the_online_controller_sets_the_threshold_each_decision_reports(
    tmp_path: Path,
) -> None:
    """controller_target_share (issue 18): the pair's threshold follows its scores toward
    the target share; every decision reports the threshold actually used."""
    policies = tmp_path / "policies"
    shutil.copytree(COMMITTED, policies / "fashion-mnist" / "1")
    async with scripted_mesh(tmp_path, policies_dir=policies, controller_target_share=0.5) as mesh:
        router = mesh.router.router
        controller = router.controllers["fashion-mnist"]
        calibrated = router.policies["fashion-mnist"].threshold
        assert controller.threshold == pytest.approx(calibrated)
        thresholds = set()
        for index in range(260):  # half hard, half confident: the target is 50 %
            kinds = [HARD if index % 2 else CONFIDENT]
            reply = await mesh.stub.Infer(request(kinds, mesh, request_id=f"c{index}"), timeout=2)
            thresholds.add(round(reply.decision.threshold, 6))
        assert controller.state().updates > 0
        assert controller.threshold != pytest.approx(calibrated)
        assert len(thresholds) > 1  # decisions reported the moving threshold
        # A new policy restarts the pair's controller from its own threshold.
        router.install_policy("fashion-mnist", MaxSoftmaxPolicy.default("fashion-mnist", 0.4))
        assert router.controllers["fashion-mnist"].threshold == pytest.approx(0.4)
