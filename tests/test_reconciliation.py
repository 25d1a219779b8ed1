"""Outbox and reconciliation on the in-process mesh (real router, edge node, cloud
service and Triton): a cloud outage queues the would-be escalations, the cloud's return
drains them once, disagreements become correction events and labelled examples."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc
from hybridmesh.common.v1 import decision_pb2, model_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2
from localmesh.triton import TritonServer
from router_service.anonymisers import face_blur
from router_service.audit import content_sha256
from router_service.tier_api import TierUnavailableError
from services.errors import FailedPreconditionError, field_violations
from services.tensors import encode_tensor
from tests.helpers.item_difficulty import easy_and_hard, hard_by_agreement
from tests.helpers.local_mesh import Mesh, restart_cloud, start_mesh, stop_mesh
from tests.helpers.photos import photo as load_photo
from tests.helpers.requests import router_request
from tests.helpers.router_node import TOKEN
from tests.helpers.waiting import eventually
from workload.fashion_mnist import load_split

pytestmark = pytest.mark.asyncio(loop_scope="module")

IMAGES = load_split("test").images[:300]
EASY, HARD = easy_and_hard(IMAGES, 20)
CORRECTED, CONFIRMED = hard_by_agreement(IMAGES, HARD)
FAST_DRAIN = {"drain_backoff_base_s": 0.1, "drain_backoff_max_s": 0.5, "drain_idle_s": 0.1}


def named(
    index: int, request_id: str, privacy: int = routing_pb2.PRIVACY_CLASS_PUBLIC
) -> router_service_pb2.InferRequest:
    request = router_request(IMAGES[index : index + 1], privacy=privacy)
    request.request_id = request_id
    return request


def cloud_request_ids(mesh: Mesh) -> list[str]:
    return [
        str(span.attributes["hybridmesh.request_id"])
        for span in mesh.cloud_spans.get_finished_spans()
        if span.name == "cloud.triton_infer" and span.attributes
    ]


def check_labelled_examples(
    mesh: Mesh,
    replies: dict[int, router_service_pb2.InferResponse],
    corrected: list[int],
    confirmed: list[int],
) -> None:
    """Every queued request has its cloud answer beside the edge answer, once."""
    examples = mesh.router.outbox.reconciled()
    assert sorted(e.request_id for e in examples) == sorted(
        [f"hard-{i}" for i in corrected + confirmed] + ["internal-1"]
    )
    for example in examples:
        if example.request_id.startswith("hard-"):
            index = int(example.request_id.split("-")[1])
            assert example.agrees == (index in confirmed)
            edge_top1 = replies[index].predictions[0].classification.top_k[0].class_index
            assert example.edge_class == edge_top1


async def recorded_correction_ids(mesh: Mesh, count: int) -> set[str]:
    replay = mesh.stub.WatchCorrections(
        router_service_pb2.WatchCorrectionsRequest(model="fashion-mnist", include_recorded=True)
    )
    replayed = set()
    for _ in range(count):
        message = await replay.read()
        assert isinstance(message, router_service_pb2.WatchCorrectionsResponse)
        replayed.add(message.correction.request_id)
    replay.cancel()
    return replayed


def check_telemetry(mesh: Mesh, *, queued: int, corrections: int) -> None:
    """The outage as the router's metrics and spans tell it."""
    assert mesh.router_counter("hybridmesh.outbox.enqueued") == queued
    assert mesh.router_counter("hybridmesh.outbox.reconciled_items") == queued
    assert mesh.router_counter("hybridmesh.outbox.corrections") == corrections
    spans = mesh.router_spans.get_finished_spans()
    # The last attempt of each item sent it; earlier ones refused by the breaker did not.
    last_attempt = {
        str(s.attributes["hybridmesh.request_id"]): s.attributes
        for s in spans
        if s.name == "router.reconcile" and s.attributes
    }
    assert len(last_attempt) == queued
    assert all(a["hybridmesh.data_left_site"] is True for a in last_attempt.values())
    decide = {
        str(s.attributes["hybridmesh.request_id"]): s.attributes
        for s in spans
        if s.name == "router.decide" and s.attributes
    }
    assert decide["sensitive-1"]["hybridmesh.data_left_site"] is False
    assert decide["internal-1"]["hybridmesh.queued_for_reconciliation"] is True


async def test_outage_queues_escalations_then_reconciles_once_with_corrections(
    mesh_triton: TritonServer,
) -> None:
    mesh = await start_mesh(mesh_triton.grpc_url, **FAST_DRAIN)
    try:
        await mesh.cloud.stop(0)  # the outage
        corrected, confirmed = CORRECTED[:3], CONFIRMED[:2]
        replies = {}
        for index in corrected + confirmed:
            replies[index] = await mesh.stub.Infer(named(index, f"hard-{index}"), timeout=5)
        # INTERNAL is queued too (it leaves anonymised later); SENSITIVE never is.
        internal = await mesh.stub.Infer(
            named(corrected[0], "internal-1", routing_pb2.PRIVACY_CLASS_INTERNAL), timeout=5
        )
        sensitive = await mesh.stub.Infer(
            named(corrected[0], "sensitive-1", routing_pb2.PRIVACY_CLASS_SENSITIVE), timeout=5
        )
        easy = await mesh.stub.Infer(named(EASY[0], "easy-1"), timeout=5)
        for reply in [*replies.values(), internal]:
            decision = reply.decision
            assert decision.served_by == routing_pb2.TIER_EDGE and decision.degraded
            assert decision.queued_for_reconciliation
            assert decision.reason in (
                decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK,
                decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN,
            )
        assert not sensitive.decision.queued_for_reconciliation
        assert sensitive.decision.reason == decision_pb2.DECISION_REASON_PRIVACY_SENSITIVE
        assert not easy.decision.queued_for_reconciliation
        outbox = mesh.router.outbox
        assert outbox.depth == len(replies) + 1
        # A client retry of a queued request (same id) is answered but not queued twice.
        retry = await mesh.stub.Infer(named(corrected[0], f"hard-{corrected[0]}"), timeout=5)
        assert retry.decision.queued_for_reconciliation
        assert outbox.depth == len(replies) + 1

        watch = mesh.stub.WatchCorrections(router_service_pb2.WatchCorrectionsRequest())
        received: list[router_service_pb2.Correction] = []

        async def collect() -> None:
            async for message in watch:
                received.append(message.correction)

        collector = asyncio.create_task(collect())
        await eventually(lambda: mesh.router.reconciler.feed.subscribers == 1)
        await restart_cloud(mesh, mesh_triton.grpc_url)  # the outage ends
        await eventually(lambda: outbox.depth == 0, timeout_s=15)
        await eventually(lambda: len(received) == len(corrected) + 1)
        collector.cancel()

        check_labelled_examples(mesh, replies, corrected, confirmed)
        by_request = {c.request_id: c for c in received}
        assert set(by_request) == {f"hard-{i}" for i in corrected} | {"internal-1"}
        for correction in by_request.values():
            assert correction.edge_class != correction.cloud_class
            assert correction.model == "fashion-mnist"
            assert (correction.edge_model.name, correction.cloud_model.name) == (
                "fashion-edge",
                "fashion-cloud",
            )
        check_telemetry(mesh, queued=len(replies) + 1, corrections=len(by_request))
        # Exactly once on the cloud side: each queued id reached Triton once, and the
        # SENSITIVE one never reached the cloud at all.
        calls = cloud_request_ids(mesh)
        for request_id in [*by_request, *(f"hard-{i}" for i in confirmed)]:
            assert calls.count(request_id) == 1
        assert "sensitive-1" not in calls
        # Recorded corrections are replayed to a late subscriber.
        assert await recorded_correction_ids(mesh, len(received)) == set(by_request)
    finally:
        await stop_mesh(mesh)


async def test_the_audit_log_records_every_transfer_with_what_was_sent(mesh: Mesh) -> None:
    index = HARD[0]
    await mesh.stub.Infer(named(index, "audited-public"), timeout=5)
    internal = named(index, "audited-internal", routing_pb2.PRIVACY_CLASS_INTERNAL)
    internal.attributes["device"] = "camera-7"
    await mesh.stub.Infer(internal, timeout=5)
    await mesh.stub.Infer(named(index, "kept-sensitive", routing_pb2.PRIVACY_CLASS_SENSITIVE))
    path = mesh.router.settings.audit_log_path
    assert path is not None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    assert "kept-sensitive" not in by_id
    sent = encode_tensor("image", np.ascontiguousarray(IMAGES[index : index + 1]))
    public, anonymised = by_id["audited-public"], by_id["audited-internal"]
    assert public["privacy_class"] == "PRIVACY_CLASS_PUBLIC" and public["anonymiser"] == ""
    assert anonymised["privacy_class"] == "PRIVACY_CLASS_INTERNAL"
    assert anonymised["anonymiser"] == "strip-attributes"
    for line in (public, anonymised):
        assert line["content_sha256"] == content_sha256([sent])
        assert line["destination"] == mesh.router.settings.cloud_target
        assert line["purpose"] == "escalation" and line["stream"] == "audit"
    # The attributes stay on site: nothing of them is in what was sent or logged.
    assert "camera-7" not in path.read_text()


async def test_the_cloud_answers_a_replay_from_its_dedupe_cache(mesh: Mesh) -> None:
    channel = grpc.aio.insecure_channel(mesh.cloud.host.address)
    stub = cloud_service_pb2_grpc.CloudServiceStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    def request(index: int, replay: bool) -> cloud_service_pb2.InferRequest:
        return cloud_service_pb2.InferRequest(
            request_id="replayed-1",
            model=model_pb2.ModelRef(name="fashion-cloud"),
            inputs=[encode_tensor("image", IMAGES[index : index + 1])],
            privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
            reconciliation=replay,
        )

    try:
        before = cloud_request_ids(mesh).count("replayed-1")
        first = await stub.Infer(request(HARD[0], False), timeout=5, metadata=metadata)
        again = await stub.Infer(request(HARD[0], True), timeout=5, metadata=metadata)
        assert again.classifications == first.classifications
        # Same id, other data: never answered from the cache.
        other = await stub.Infer(request(EASY[0], True), timeout=5, metadata=metadata)
        spans = [
            s
            for s in mesh.cloud_spans.get_finished_spans()
            if s.name == "cloud.triton_infer"
            and s.attributes
            and s.attributes["hybridmesh.request_id"] == "replayed-1"
        ][before:]
        assert [s.attributes.get("hybridmesh.deduplicated") for s in spans if s.attributes] == [
            None,
            True,
            False,
        ]
        assert all(s.attributes and s.attributes["hybridmesh.data_left_site"] for s in spans)
        assert other.classifications[0].top_k[0].class_index != -1
    finally:
        await channel.close(None)


async def test_watch_corrections_names_an_unknown_model(mesh: Mesh) -> None:
    stream = mesh.stub.WatchCorrections(
        router_service_pb2.WatchCorrectionsRequest(model="nope"), timeout=5
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.read()
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model" in field_violations(refused.value)


async def test_the_cloud_tier_refuses_sensitive_data_and_uploads_only_anonymised(
    mesh: Mesh,
) -> None:
    tier = mesh.router.router.cloud
    image = encode_tensor("image", IMAGES[:1])

    async def send(request_id: str, privacy: int, anonymiser: str, tensor: object) -> None:
        await tier.infer(
            request_id=request_id,
            model="fashion-cloud",
            inputs=[tensor],  # type: ignore[list-item]
            top_k=1,
            timeout_s=5,
            privacy_class=privacy,  # type: ignore[arg-type]
            anonymiser=anonymiser,
        )

    with pytest.raises(FailedPreconditionError):
        await send("tier-sensitive", routing_pb2.PRIVACY_CLASS_SENSITIVE, "face-blur", image)
    with pytest.raises(FailedPreconditionError):
        await send("tier-internal-raw", routing_pb2.PRIVACY_CLASS_INTERNAL, "", image)
    # A photograph through the face-blur anonymiser: what goes out is the blurred image
    # (the fashion model then refuses its shape, which does not matter here).
    photo = encode_tensor("photo", load_photo()[None])
    with pytest.raises(TierUnavailableError):
        await send("tier-photo", routing_pb2.PRIVACY_CLASS_INTERNAL, "face-blur", photo)
    path = mesh.router.settings.audit_log_path
    assert path is not None
    by_id = {line["request_id"]: line for line in map(json.loads, path.read_text().splitlines())}
    assert "tier-sensitive" not in by_id and "tier-internal-raw" not in by_id
    calls = cloud_request_ids(mesh)
    assert "tier-sensitive" not in calls and "tier-internal-raw" not in calls
    audited = by_id["tier-photo"]
    assert audited["regions_blurred"] == 1 and audited["anonymiser"] == "face-blur"
    assert audited["content_sha256"] == content_sha256([face_blur(photo).tensor])
    assert audited["content_sha256"] != content_sha256([photo])


async def test_a_sample_of_confident_edge_answers_is_checked_by_the_cloud(
    mesh_triton: TritonServer,
) -> None:
    mesh = await start_mesh(mesh_triton.grpc_url, outbox_sample_rate=1.0, **FAST_DRAIN)
    try:
        reply = await mesh.stub.Infer(named(EASY[0], "sampled-1"), timeout=5)
        decision = reply.decision
        assert decision.reason == decision_pb2.DECISION_REASON_EDGE_CONFIDENT
        assert decision.queued_for_reconciliation and not decision.degraded
        kept = await mesh.stub.Infer(
            named(EASY[1], "sampled-sensitive", routing_pb2.PRIVACY_CLASS_SENSITIVE), timeout=5
        )
        assert not kept.decision.queued_for_reconciliation
        await eventually(lambda: len(mesh.router.outbox.reconciled()) == 1)
        (example,) = mesh.router.outbox.reconciled()
        assert example.request_id == "sampled-1" and example.cloud_model.startswith("fashion-cloud")
        assert "sampled-sensitive" not in cloud_request_ids(mesh)
    finally:
        await stop_mesh(mesh)
