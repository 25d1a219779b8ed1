"""A second model pair by configuration only, through the real local mesh.

The scikit-learn digits pair (``tests/helpers/digits_pair.py``: FP32 ``pixels`` [n, 64],
``probabilities`` output, a labelled ``.npz``) joins Fashion-MNIST in a catalog, its
policy is trained with the CLI (``hybridmesh policy train``), and ``hybridmesh up``'s
launcher serves both, plus a third pair that declares no data and has no policy (the same
digits models under another name). Shown: every pair is answered, each decision names
its own pair's policy, the second pair's escalations reach Triton's second model, a pair
without a policy is served by the max-softmax default, and a policy update of one pair
(publish + promote with the registry CLI) leaves the others' versions unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio

from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2, router_service_pb2_grpc
from localmesh.launcher import LocalMesh, MeshOptions, MeshState
from localmesh.ota import ModelSources
from services.tensors import encode_tensor
from tests.helpers.digits_pair import PAIR as DIGITS
from tests.helpers.digits_pair import DigitsPair, build_digits_pair
from tests.helpers.paths import SERVED_POLICY_VERSION
from tests.helpers.requests import router_request
from tests.helpers.waiting import eventually
from workload.fashion_mnist import load_split

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.asyncio(loop_scope="module"),
]
REPO = Path(__file__).resolve().parent.parent
FASHION = "fashion-mnist"
# The same digits models under another name, with no data and so no policy.
NO_POLICY = "digits-no-policy"
NO_POLICY_ENTRY = """
[pairs.digits-no-policy]
edge_model = "digits-edge"
cloud_model = "digits-cloud"
input = { name = "pixels", datatype = "FP32", shape = [-1, 64] }
output = { name = "probabilities", datatype = "FP32", shape = [-1, 10] }
output_kind = "probabilities"
"""


def cli(
    *arguments: str, cwd: Path, module: str = "localmesh.cli", state_dir: Path | None = None
) -> str:
    """Run the CLI; ``state_dir``: the local mesh whose operator `hybridmesh registry`
    calls as (its token and signing keys)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    if state_dir is not None:
        environment["HYBRIDMESH_STATE_DIR"] = str(state_dir)
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@dataclass
class TwoPairMesh:
    mesh: LocalMesh
    state: MeshState
    digits: DigitsPair
    base: Path
    stub: router_service_pb2_grpc.RouterServiceAsyncStub

    def policy_args(self) -> list[str]:
        return [
            "--catalog", str(self.digits.catalog), "--store", str(self.digits.store),
        ]  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TwoPairMesh]:
    base = tmp_path_factory.mktemp("two-pairs")
    store, policies = base / "store", base / "policies"
    for model in ("fashion-edge", "fashion-cloud"):
        shutil.copytree(REPO / "models" / "store" / model, store / model)
    shutil.copytree(REPO / "models" / "policies" / FASHION, policies / FASHION)
    catalog_head = (REPO / "models" / "catalog.toml").read_text() + NO_POLICY_ENTRY
    digits = await asyncio.to_thread(build_digits_pair, base, store, catalog_head)
    common = ["--pair", DIGITS, "--catalog", str(digits.catalog), "--store", str(store)]
    common += ["--policies", str(policies)]
    # Two versions through the CLI, one per kind of target; the site gets the newest.
    for target in ("cloud-share=0.2", "edge-error=0.02"):
        await asyncio.to_thread(cli, "policy", "train", *common, "--target", target, cwd=base)
    mesh = LocalMesh(
        MeshOptions(
            state_dir=base / "mesh",
            repository_root=REPO,
            random_ports=True,
            wan_delay_ms=5,
            models=ModelSources(digits.catalog, store, policies),
            router_environment={"HYBRIDMESH_ROUTER_POLICY_UPDATE_INTERVAL_S": "1"},
        )
    )
    state = await mesh.up()
    try:
        async with grpc.aio.insecure_channel(state.endpoints["router"]) as channel:
            yield TwoPairMesh(
                mesh, state, digits, base, router_service_pb2_grpc.RouterServiceStub(channel)
            )
    finally:
        await mesh.down()


def digits_request(
    pair: str, pixels: npt.NDArray[np.float32], preference: int = routing_pb2.ROUTE_PREFERENCE_AUTO
) -> router_service_pb2.InferRequest:
    return router_service_pb2.InferRequest(
        model=pair,
        inputs=[encode_tensor("pixels", pixels)],
        hints=routing_pb2.RoutingHints(
            privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
            preference=preference,  # type: ignore[arg-type]
        ),
        top_k=3,
    )


def hardest_digits(digits: DigitsPair, count: int) -> list[int]:
    """Held-out items the edge model is least sure of: the router escalates these."""
    top1 = digits.models["digits-edge"].predict_proba(digits.held_out).max(axis=1)
    return [int(i) for i in np.argsort(top1)[:count]]


async def policy_versions(stub: router_service_pb2_grpc.RouterServiceAsyncStub) -> dict[str, str]:
    """The policy version each pair's decision names, one request per pair."""
    image = load_split("test").images[:1]
    pixels = np.zeros((1, 64), np.float32)
    replies = {
        FASHION: await stub.Infer(router_request(image), timeout=10),
        DIGITS: await stub.Infer(digits_request(DIGITS, pixels), timeout=10),
        NO_POLICY: await stub.Infer(digits_request(NO_POLICY, pixels), timeout=10),
    }
    return {pair: reply.decision.policy_version for pair, reply in replies.items()}


async def test_every_pair_is_answered_with_its_own_policy(running: TwoPairMesh) -> None:
    digits = running.digits
    labels = digits.held_out_labels
    fashion = load_split("test")
    correct = 0
    for index in range(20):
        reply = await running.stub.Infer(
            router_request(fashion.images[index : index + 1]), timeout=10
        )
        assert reply.decision.policy_version == SERVED_POLICY_VERSION
        correct += reply.predictions[0].classification.top_k[0].class_index == fashion.labels[index]
    assert correct >= 16
    for pair, version in ((DIGITS, "2"), (NO_POLICY, "max-softmax-default")):
        answers = []
        for index in range(20):
            reply = await running.stub.Infer(
                digits_request(pair, digits.held_out[index : index + 1]), timeout=10
            )
            assert reply.decision.policy_version == version, (pair, reply.decision)
            answers.append(reply.predictions[0].classification.top_k[0].class_index)
        assert np.mean(np.array(answers) == labels[:20]) >= 0.85, pair
    # The router's start-up log names each pair's policy.
    log = await asyncio.to_thread(Path(running.state.logs["router"]).read_text)
    for pair, version in (
        (FASHION, SERVED_POLICY_VERSION),
        (DIGITS, "2"),
        (NO_POLICY, "max-softmax-default"),
    ):
        assert any(
            '"router policy"' in line and f'"pair": "{pair}"' in line
            and f'"version": "{version}"' in line
            for line in log.splitlines()
        ), (pair, version)  # fmt: skip


async def test_second_pair_escalations_reach_tritons_second_model(running: TwoPairMesh) -> None:
    served_by = []
    for index in hardest_digits(running.digits, 8):
        pixels = running.digits.held_out[index : index + 1]
        reply = await running.stub.Infer(digits_request(DIGITS, pixels), timeout=10)
        served_by.append(reply.decision.served_by)
    assert routing_pb2.TIER_CLOUD in served_by, served_by
    intake = Path(running.state.audit_logs["cloud_intake"])
    lines = (await asyncio.to_thread(intake.read_text)).splitlines()
    models = [json.loads(line).get("model") for line in lines]
    assert "digits-cloud" in models, models


async def test_a_policy_update_of_one_pair_leaves_the_others_alone(
    running: TwoPairMesh,
) -> None:
    before = await policy_versions(running.stub)
    assert before == {FASHION: SERVED_POLICY_VERSION, DIGITS: "2", NO_POLICY: "max-softmax-default"}
    # The operator trains v3 of the digits policy elsewhere, publishes and promotes it.
    operator = running.base / "operator-policies"
    shutil.copytree(running.base / "policies" / DIGITS, operator / DIGITS)
    state_dir = Path(running.state.state_dir)
    cli(
        "policy", "train", "--pair", DIGITS, *running.policy_args(),
        "--policies", str(operator), "--target", "cloud-share=0.25", cwd=running.base,
    )  # fmt: skip
    registry = running.state.endpoints["registry"]
    ref = ["--kind", "router-policy", "--name", DIGITS, "--version", "3"]
    cli(
        "registry", "publish", "--root", str(state_dir / "registry"),
        "--keys", str(state_dir / "operator"), *ref, str(operator / DIGITS / "3"),
        cwd=running.base,
    )  # fmt: skip
    cli("registry", "promote", "--registry", registry, *ref, cwd=running.base, state_dir=state_dir)
    seen: list[dict[str, str]] = []

    async def digits_v3() -> bool:
        seen.append(await policy_versions(running.stub))
        return seen[-1][DIGITS] == "3"

    await eventually(digits_v3, 60, lambda: seen[-1:])
    after = seen[-1]
    assert after == {FASHION: SERVED_POLICY_VERSION, DIGITS: "3", NO_POLICY: "max-softmax-default"}
    assert (state_dir / "site" / "policies" / DIGITS / "3").is_dir()
    site_fashion = state_dir / "site" / "policies" / FASHION
    assert sorted(p.name for p in site_fashion.iterdir()) == [SERVED_POLICY_VERSION]
    assert not (state_dir / "site" / "policies" / NO_POLICY).exists()
    # The site's reports (router: policies, edge node: models) and `hybridmesh status`.
    statuses: list[str] = []

    def pair_lines() -> dict[str, str]:
        return {line.split()[1]: line for line in statuses[-1].splitlines() if " pair " in line}

    def reported() -> bool:
        statuses.append(cli("--state-dir", str(state_dir), "status", cwd=REPO))
        lines = pair_lines()
        return "policy v3" in lines.get(DIGITS, "") and "edge digits-edge v1" in lines[DIGITS]

    await eventually(reported, 30, lambda: statuses[-1:])
    lines = pair_lines()
    assert (
        f"edge fashion-edge v1, cloud fashion-cloud v1, policy v{SERVED_POLICY_VERSION}"
        in lines[FASHION]
    )
    assert "cloud digits-cloud v1, policy v3" in lines[DIGITS]
    assert "policy max-softmax-default" in lines[NO_POLICY]
    sites = cli("registry", "sites", "--registry", registry, cwd=REPO, state_dir=state_dir)
    assert (
        f"{DIGITS} v3" in sites
        and f"{FASHION} v{SERVED_POLICY_VERSION}" in sites
        and "fashion-edge v1" in sites
    )
