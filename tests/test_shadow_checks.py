"""Shadow checks (router_service/shadow.py): a sample of kept answers also goes to the
cloud in the background. The sampler never picks SENSITIVE or non-anonymised INTERNAL
data (property test, and a real router + edge + cloud + Triton mesh whose cloud saw only
PUBLIC shadow items); a check never changes or holds up the caller's answer (a real
router in front of scripted tiers whose cloud hangs on the check); checks are audited,
billed and traced as shadow, feed the edge-error estimate and leave labels retrain reads.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import NumberDataPoint
from pydantic import ValidationError

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from localmesh.triton import TritonServer
from router_service.app import pairs_from_catalog
from router_service.outbox import SCHEMA, Outbox, ReconciledItem
from router_service.shadow import KeptAnswers, ShadowChecker, ShadowSettings, shadow_eligible
from tests.helpers.local_mesh import Mesh, start_mesh, stop_mesh
from tests.helpers.paths import REPO, STORE
from tests.helpers.requests import router_request
from tests.helpers.router_node import router_settings
from tests.helpers.scripted_tiers import CONFIDENT, Call, hang, request, scripted_mesh
from tests.helpers.triton import TRITON_MODELS  # noqa: F401 (the mesh's models)
from tests.helpers.waiting import eventually
from training.retrain import reconciled_examples
from training.train_policy import pair_models
from workload.fashion_mnist import load_split

PRIVACY = [
    routing_pb2.PRIVACY_CLASS_UNSPECIFIED,
    routing_pb2.PRIVACY_CLASS_PUBLIC,
    routing_pb2.PRIVACY_CLASS_INTERNAL,
    routing_pb2.PRIVACY_CLASS_SENSITIVE,
]
PAIR = pairs_from_catalog(REPO / "models" / "catalog.toml")[0]


class NoCloud:
    """Never called: the sampler's decision comes before any cloud call."""


@given(
    privacy=st.sampled_from(PRIVACY),
    internal=st.booleans(),
    anonymiser=st.sampled_from(["", "strip-attributes", "face-blur"]),
    batch=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_the_sampler_never_draws_sensitive_or_non_anonymised_internal_items(
    privacy: int, internal: bool, anonymiser: str, batch: int, seed: int
) -> None:
    checker = ShadowChecker(
        ShadowSettings(rate=1.0, max_in_flight=4, timeout_s=1.0, internal=internal),
        NoCloud(),  # type: ignore[arg-type]
        {},
        tracer=trace.NoOpTracer(),
        rng=random.Random(seed),
    )
    pair = PAIR.__class__(**{**PAIR.__dict__, "anonymiser": anonymiser})
    kept = KeptAnswers(
        request_id="r",
        pair=pair,
        privacy_class=privacy,  # type: ignore[arg-type]
        inputs=np.zeros((batch, 1, 28, 28), np.uint8),
        indices=tuple(range(batch)),
        edge_classes=(0,) * batch,
        scores=(0.0,) * batch,
        edge_model="e:1",
    )
    drawn = checker.sample(kept)
    allowed = privacy == routing_pb2.PRIVACY_CLASS_PUBLIC or (
        privacy == routing_pb2.PRIVACY_CLASS_INTERNAL and internal and anonymiser != ""
    )
    assert shadow_eligible(privacy, anonymiser, internal=internal) is allowed  # type: ignore[arg-type]
    # At rate 1 every allowed item is drawn; nothing otherwise.
    assert drawn == (tuple(range(batch)) if allowed else ())


def _shadow_calls(calls: list[Call]) -> list[Call]:
    return [call for call in calls if call.request_id == "kept-1:shadow"]


async def test_a_hanging_shadow_check_neither_changes_nor_holds_up_the_answer(
    tmp_path: Path,
) -> None:
    answers = []
    for rate in (0.0, 1.0):
        async with scripted_mesh(tmp_path / str(rate), shadow_check_rate=rate) as mesh:
            mesh.cloud.tier.script(hang())  # the cloud never answers the check
            reply = await mesh.stub.Infer(
                request([CONFIDENT, CONFIDENT], mesh, request_id="kept-1"), timeout=10
            )
            answers.append(reply)
            if rate == 0.0:
                assert mesh.cloud.tier.calls == []
                continue

            calls = mesh.cloud.tier.calls
            # The check reaches the cloud after the answer, and hangs there: the answer
            # was sent without waiting for it.
            await eventually(functools.partial(_shadow_calls, calls))
            shadow_calls = _shadow_calls(calls)
            assert len(shadow_calls) == 1 and not shadow_calls[0].outcome.done()
            assert shadow_calls[0].items == 2
            assert mesh.router.router.shadow is not None
            assert len(mesh.router.router.shadow.tasks) == 1
            (audit,) = mesh.audited("kept-1:shadow")
            assert audit["purpose"] == "shadow" and audit["privacy_class"] == "PRIVACY_CLASS_PUBLIC"
    without, with_check = answers
    assert with_check.decision.served_by == routing_pb2.TIER_EDGE
    assert with_check.decision.reason == decision_pb2.DECISION_REASON_EDGE_CONFIDENT
    assert not with_check.decision.data_left_site
    assert with_check.decision.cost == without.decision.cost
    assert list(with_check.predictions) == list(without.predictions)


async def test_sensitive_and_internal_requests_are_never_shadow_checked_by_default(
    tmp_path: Path,
) -> None:
    async with scripted_mesh(tmp_path, shadow_check_rate=1.0) as mesh:
        for privacy, name in (
            (routing_pb2.PRIVACY_CLASS_SENSITIVE, "s"),
            (routing_pb2.PRIVACY_CLASS_INTERNAL, "i"),
        ):
            reply = await mesh.stub.Infer(
                request([CONFIDENT], mesh, request_id=name, privacy=privacy), timeout=10
            )
            assert reply.decision.served_by == routing_pb2.TIER_EDGE
        assert mesh.cloud.tier.calls == []
        assert mesh.router.router.shadow is not None and not mesh.router.router.shadow.tasks


def _shadow_cost(mesh: Mesh) -> int:
    data = mesh.router_metrics.get_metrics_data()
    total = 0
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "hybridmesh.router.cost":
                    total += sum(
                        int(point.value)
                        for point in metric.data.data_points
                        if isinstance(point, NumberDataPoint)
                        and (point.attributes or {}).get("shadow") is True
                    )
    return total


async def test_on_a_real_mesh_the_cloud_sees_only_public_shadow_items_and_labels_are_kept(
    mesh_triton: TritonServer,
) -> None:
    mesh = await start_mesh(mesh_triton.grpc_url, shadow_check_rate=1.0, shadow_max_in_flight=64)
    try:
        images = load_split("test").images[:24]
        privacies = [
            routing_pb2.PRIVACY_CLASS_PUBLIC,
            routing_pb2.PRIVACY_CLASS_INTERNAL,
            routing_pb2.PRIVACY_CLASS_SENSITIVE,
        ]
        kept_public = 0
        for index, image in enumerate(images):
            privacy = privacies[index % 3]
            message = router_request(image[None], privacy=privacy)
            message.request_id = f"real-{index}"
            reply = await mesh.stub.Infer(message, timeout=10)
            if (
                privacy == routing_pb2.PRIVACY_CLASS_PUBLIC
                and reply.decision.reason == decision_pb2.DECISION_REASON_EDGE_CONFIDENT
            ):
                kept_public += 1
        shadow = mesh.router.router.shadow
        assert shadow is not None and kept_public > 0
        await shadow.drain()
        shadow_spans = [
            s
            for s in mesh.cloud_spans.get_finished_spans()
            if str((s.attributes or {}).get("hybridmesh.request_id", "")).endswith(":shadow")
        ]
        # The cloud saw one shadow call per kept PUBLIC answer, and nothing else.
        assert len(shadow_spans) == kept_public
        assert {(s.attributes or {}).get("hybridmesh.privacy_class") for s in shadow_spans} == {
            "PRIVACY_CLASS_PUBLIC"
        }
        estimate = mesh.router.router.edge_error["fashion-mnist"].estimate()
        assert estimate.samples == kept_public
        assert _shadow_cost(mesh) == kept_public * mesh.router.settings.cloud_price_micros
        # The router's shadow span is in the request's trace and links to its span.
        router_spans = mesh.router_spans.get_finished_spans()
        decide = {s.context.span_id: s for s in router_spans if s.name == "router.decide"}
        checks = [s for s in router_spans if s.name == "router.shadow_check"]
        assert len(checks) == kept_public
        for check in checks:
            assert check.parent is not None and check.parent.span_id in decide
            assert [link.context.span_id for link in check.links] == [check.parent.span_id]
            assert (check.attributes or {}).get("hybridmesh.shadow") is True
        # The labels, marked as shadow, are where training.retrain reads them.
        store = Outbox(mesh.router.settings.outbox_path, max_items=1, synchronous="NORMAL")
        try:
            labels = await asyncio.to_thread(store.reconciled)
        finally:
            store.close()
        assert len(labels) == kept_public
        assert {label.source for label in labels} == {"shadow"}
        assert all(label.request_id.endswith(":shadow") for label in labels)
        models = pair_models(mesh.router.settings.catalog, "fashion-mnist", STORE)
        examples = reconciled_examples(mesh.router.settings.outbox_path, models.pair, models.edge)
        assert examples.count == kept_public
    finally:
        await stop_mesh(mesh)


def test_an_outbox_written_before_shadow_labels_opens_and_records_them(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old_schema = SCHEMA.replace("    source TEXT NOT NULL DEFAULT 'reconciliation',\n", "")
    assert "source" not in old_schema
    db = sqlite3.connect(path)
    db.executescript(old_schema)
    db.execute(
        "INSERT INTO reconciled VALUES ('r', 0, 'fashion-mnist', 1, 2, 'e:1', 3, 'c:1', 3, 1, x'')"
    )
    db.commit()
    db.close()
    store = Outbox(path, max_items=10)
    try:
        label = ReconciledItem(
            "r:shadow", 0, "fashion-mnist", 1, 2, "e:1", 3, "c:1", 4, b"", "shadow"
        )
        assert store.record([label]) == 1
        assert store.record([label]) == 0  # the same check recorded twice is kept once
        assert [(item.request_id, item.source) for item in store.reconciled()] == [
            ("r", "reconciliation"),
            ("r:shadow", "shadow"),
        ]
    finally:
        store.close()


def test_the_router_takes_one_target_and_the_edge_error_target_needs_shadow_checks() -> None:
    with pytest.raises(ValidationError, match="one controller target"):
        router_settings(
            "a:1", "b:2", controller_target_share=0.2, controller_target_edge_error=0.05
        )
    with pytest.raises(ValidationError, match="shadow_check_rate"):
        router_settings("a:1", "b:2", controller_target_edge_error=0.05)
    settings = router_settings(
        "a:1", "b:2", controller_target_edge_error=0.05, shadow_check_rate=0.02
    )
    assert settings.controller_target_share is None


async def test_the_edge_error_target_moves_the_threshold_from_shadow_checks(
    tmp_path: Path,
) -> None:
    """controller_target_edge_error: the scripted cloud disagrees with every kept edge
    answer (class 7 vs 3), so once 50 checks are in, the estimate's interval lies above
    the 5 % target and the controller escalates more (lowers the threshold); decisions
    report it. A new policy empties the pair's estimate."""
    async with scripted_mesh(
        tmp_path,
        shadow_check_rate=1.0,
        shadow_max_in_flight=64,
        controller_target_edge_error=0.05,
    ) as mesh:
        router = mesh.router.router
        shadow = router.shadow
        assert shadow is not None
        controller = router.controllers["fashion-mnist"]
        calibrated = controller.threshold
        for index in range(4):
            await mesh.stub.Infer(
                request([CONFIDENT] * 32, mesh, request_id=f"e{index}"), timeout=10
            )
            await shadow.drain()
        estimate = router.edge_error["fashion-mnist"].estimate()
        assert estimate.samples == 128 and estimate.estimate == 1.0
        state = controller.state()
        assert state.holds_edge_error and state.last_step == 0.02 and state.catching_up
        assert controller.threshold < calibrated
        # The next decision uses (and reports) the threshold the checks moved.
        reply = await mesh.stub.Infer(request([CONFIDENT], mesh, request_id="e-n"), timeout=10)
        assert reply.decision.threshold == pytest.approx(controller.threshold)
        router.install_policy("fashion-mnist", router.policies["fashion-mnist"])
        assert router.edge_error["fashion-mnist"].estimate().samples == 0
