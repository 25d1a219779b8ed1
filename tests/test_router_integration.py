"""The router with the real edge node, the real cloud service and the real Triton."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from hybridmesh.common.v1 import decision_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2
from localmesh.triton import TritonServer
from router_service.escalation import latest_policy, read_policy_metadata
from services.errors import field_violations
from services.tensors import encode_tensor
from tests.helpers.item_difficulty import easy_and_hard
from tests.helpers.local_mesh import Mesh, start_mesh, stop_mesh
from tests.helpers.paths import POLICY_ROOT, SERVED_POLICY_VERSION
from tests.helpers.requests import router_request
from tests.helpers.waiting import eventually
from workload.fashion_mnist import load_split

pytestmark = pytest.mark.asyncio(loop_scope="module")
IMAGES = load_split("test").images[:500]
EASY, HARD = easy_and_hard(IMAGES, 6)


def cloud_calls(mesh: Mesh) -> int:
    return len([s for s in mesh.cloud_spans.get_finished_spans() if s.name == "cloud.triton_infer"])


async def test_easy_items_stay_on_the_edge_and_hard_ones_escalate(any_edge_mesh: Mesh) -> None:
    mesh = any_edge_mesh
    for index in EASY:
        reply = await mesh.stub.Infer(router_request(IMAGES[index : index + 1]), timeout=5)
        decision = reply.decision
        assert decision.served_by == routing_pb2.TIER_EDGE
        assert decision.reason == decision_pb2.DECISION_REASON_EDGE_CONFIDENT
        assert not decision.data_left_site and not decision.degraded
        assert decision.escalation_score < decision.threshold
    for index in HARD:
        reply = await mesh.stub.Infer(router_request(IMAGES[index : index + 1]), timeout=5)
        decision = reply.decision
        assert decision.served_by == routing_pb2.TIER_CLOUD, decision.explanation
        assert decision.reason == decision_pb2.DECISION_REASON_ESCALATED_HARD_CASE
        assert decision.data_left_site and not decision.degraded
        assert decision.cloud_model.name == "fashion-cloud" and decision.cloud_model.version == "1"
        assert decision.edge_model.version == "1"
        assert decision.policy_version == SERVED_POLICY_VERSION
        assert decision.cost.cloud_micros == 1500 and decision.cost.all_cloud_micros == 1500
        assert decision.timings.cloud.ToNanoseconds() > 0 and len(decision.trace_id) == 32
    assert cloud_calls(mesh) == len(HARD)


async def test_sensitive_data_never_reaches_the_cloud(any_edge_mesh: Mesh) -> None:
    mesh = any_edge_mesh
    before = cloud_calls(mesh)
    for index in HARD:
        reply = await mesh.stub.Infer(
            router_request(IMAGES[index : index + 1], privacy=routing_pb2.PRIVACY_CLASS_SENSITIVE),
            timeout=5,
        )
        assert reply.decision.served_by == routing_pb2.TIER_EDGE
        assert reply.decision.reason == decision_pb2.DECISION_REASON_PRIVACY_SENSITIVE
        assert not reply.decision.data_left_site and not reply.decision.degraded
    assert cloud_calls(mesh) == before, "the cloud saw SENSITIVE data"


async def test_internal_data_goes_out_anonymised(any_edge_mesh: Mesh) -> None:
    mesh = any_edge_mesh
    reply = await mesh.stub.Infer(
        router_request(IMAGES[HARD[0] : HARD[0] + 1], privacy=routing_pb2.PRIVACY_CLASS_INTERNAL),
        timeout=5,
    )
    assert reply.decision.served_by == routing_pb2.TIER_CLOUD  # the cloud accepted it


async def test_preferences_are_honoured(any_edge_mesh: Mesh) -> None:
    mesh = any_edge_mesh
    hard = IMAGES[HARD[0] : HARD[0] + 1]
    edge_only = await mesh.stub.Infer(
        router_request(hard, preference=routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY), timeout=5
    )
    assert edge_only.decision.reason == decision_pb2.DECISION_REASON_PREFERENCE_EDGE_ONLY
    easy = IMAGES[EASY[0] : EASY[0] + 1]
    cloud_only = await mesh.stub.Infer(
        router_request(easy, preference=routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY), timeout=5
    )
    assert cloud_only.decision.served_by == routing_pb2.TIER_CLOUD
    assert cloud_only.decision.reason == decision_pb2.DECISION_REASON_PREFERENCE_CLOUD_ONLY
    assert not cloud_only.decision.HasField("edge_model")


async def test_a_batch_is_split_across_tiers(any_edge_mesh: Mesh) -> None:
    mesh = any_edge_mesh
    indices = [EASY[0], HARD[0], EASY[1], HARD[1]]
    reply = await mesh.stub.Infer(router_request(IMAGES[indices]), timeout=5)
    assert reply.decision.served_by == routing_pb2.TIER_EDGE_AND_CLOUD
    tiers = [p.served_by for p in reply.predictions]
    assert tiers == [routing_pb2.TIER_EDGE, routing_pb2.TIER_CLOUD] * 2
    assert reply.decision.cost.cloud_micros == 2 * 1500
    assert list(reply.outputs[0].shape) == [4, 10]


async def test_progressive_answer_edge_first_then_cloud(any_edge_mesh: Mesh) -> None:
    mesh = any_edge_mesh
    hard = IMAGES[HARD[0] : HARD[0] + 1]
    stream = mesh.stub.InferStream(
        router_service_pb2.InferStreamRequest(request=router_request(hard)), timeout=5
    )
    messages = [message async for message in stream]
    assert [m.sequence for m in messages] == [0, 1]
    first, second = messages
    assert first.response.decision.served_by == routing_pb2.TIER_EDGE and not first.final
    assert second.response.decision.served_by == routing_pb2.TIER_CLOUD and second.final
    assert second.supersedes_previous
    same = (
        first.response.predictions[0].classification.top_k[0].class_index
        == second.response.predictions[0].classification.top_k[0].class_index
    )
    assert second.agrees_with_previous == same
    easy = IMAGES[EASY[0] : EASY[0] + 1]
    stream = mesh.stub.InferStream(
        router_service_pb2.InferStreamRequest(request=router_request(easy)), timeout=5
    )
    only = [message async for message in stream]
    assert len(only) == 1 and only[0].final and not only[0].supersedes_previous


async def test_bad_requests_name_their_field(any_edge_mesh: Mesh) -> None:
    mesh = any_edge_mesh
    wrong_pair = router_request(IMAGES[:1])
    wrong_pair.model = "nope"
    wrong_input = router_service_pb2.InferRequest(
        model="fashion-mnist", inputs=[encode_tensor("image", IMAGES[:1, :, :, :27].copy())]
    )
    # A malformed budget hint beside a deadline (which wins) was silently ignored.
    bad_budget = router_request(IMAGES[:1])
    bad_budget.hints.budget.seconds, bad_budget.hints.budget.nanos = 1, -5
    negative_budget = router_request(IMAGES[:1])
    negative_budget.hints.budget.seconds = -5
    for request, code, field in (
        (wrong_pair, grpc.StatusCode.NOT_FOUND, "model"),
        (wrong_input, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape"),
        (bad_budget, grpc.StatusCode.INVALID_ARGUMENT, "hints.budget"),
        (negative_budget, grpc.StatusCode.INVALID_ARGUMENT, "hints.budget"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.stub.Infer(request, timeout=5)
        assert refused.value.code() == code
        assert field in field_violations(refused.value)


async def test_cloud_killed_every_request_still_answered_and_breaker_opens(
    mesh_triton: TritonServer,
) -> None:
    mesh = await start_mesh(mesh_triton.grpc_url)
    try:
        await mesh.cloud.stop(0)  # the cloud service is gone
        replies = []
        for index in HARD * 2:
            replies.append(
                await mesh.stub.Infer(router_request(IMAGES[index : index + 1]), timeout=5)
            )
        assert all(r.decision.served_by == routing_pb2.TIER_EDGE for r in replies)
        assert all(r.decision.degraded for r in replies)
        # Each would-be escalation is kept for the cloud (request ids are fresh uuids).
        assert all(r.decision.queued_for_reconciliation for r in replies)
        assert mesh.router.outbox.depth == len(replies)
        reasons = [r.decision.reason for r in replies]
        assert reasons[0] == decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK
        # After 5 consecutive failures the breaker is open: no more calls to the dead cloud.
        assert reasons[-1] == decision_pb2.DECISION_REASON_CLOUD_BREAKER_OPEN
        assert not replies[-1].decision.data_left_site
    finally:
        await stop_mesh(mesh)


async def test_edge_killed_public_goes_to_the_cloud_sensitive_is_refused(
    mesh_triton: TritonServer,
) -> None:
    mesh = await start_mesh(mesh_triton.grpc_url)
    try:
        await mesh.edge.stop(0)
        image = IMAGES[EASY[0] : EASY[0] + 1]
        reply = await mesh.stub.Infer(router_request(image), timeout=5)
        assert reply.decision.served_by == routing_pb2.TIER_CLOUD
        assert reply.decision.reason == decision_pb2.DECISION_REASON_EDGE_FAILED_CLOUD_FALLBACK
        assert reply.decision.degraded and reply.decision.data_left_site
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.stub.Infer(
                router_request(image, privacy=routing_pb2.PRIVACY_CLASS_SENSITIVE), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "PRIVACY_SENSITIVE" in (refused.value.details() or "")
    finally:
        await stop_mesh(mesh)


@pytest.fixture
async def black_hole() -> AsyncIterator[str]:
    """A TCP peer that accepts and never answers: a cloud slower than any deadline."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}"
    for writer in held:
        writer.close()
    server.close()


async def test_cloud_slower_than_the_deadline_falls_back_inside_the_budget(
    mesh_triton: TritonServer, black_hole: str
) -> None:
    mesh = await start_mesh(mesh_triton.grpc_url)
    await mesh.router.stop(0)
    from router_service.app import RouterNode, pairs_from_catalog
    from services.telemetry import create_telemetry
    from tests.helpers.router_node import router_settings

    settings = router_settings(mesh.edge.host.address, black_hole)
    slow = RouterNode(
        settings, create_telemetry("r", export_otlp=False), pairs_from_catalog(settings.catalog)
    )
    await slow.start()
    channel = grpc.aio.insecure_channel(slow.host.address)
    try:
        from hybridmesh.router.v1 import router_service_pb2_grpc

        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        await eventually(lambda: slow.tier_up["edge"])
        # The call itself carries the budget: an answer (not DEADLINE_EXCEEDED) means the
        # router gave up on the cloud and replied inside the caller's 250 ms.
        reply = await stub.Infer(router_request(IMAGES[HARD[0] : HARD[0] + 1]), timeout=0.25)
        assert reply.decision.served_by == routing_pb2.TIER_EDGE
        assert reply.decision.degraded
        assert reply.decision.reason == decision_pb2.DECISION_REASON_CLOUD_FAILED_EDGE_FALLBACK
        assert reply.decision.timings.total.ToMilliseconds() < 250
    finally:
        await channel.close(None)
        await slow.stop(0)
        await stop_mesh(mesh)


async def test_hedged_escalation_cancels_the_loser(mesh_triton: TritonServer) -> None:
    """With a tight budget the cloud is called beside the edge; a confident edge answer
    wins and the cloud call is cancelled, an ambiguous one waits for the cloud."""
    mesh = await start_mesh(mesh_triton.grpc_url, hedge_below_budget_s=10.0)
    try:
        easy = await mesh.stub.Infer(router_request(IMAGES[EASY[0] : EASY[0] + 1]), timeout=5)
        assert easy.decision.served_by == routing_pb2.TIER_EDGE
        assert easy.decision.reason == decision_pb2.DECISION_REASON_EDGE_CONFIDENT
        assert "hedged cloud call cancelled" in easy.decision.explanation
        # Honest accounting: the bytes went out and the cloud bills what it was sent.
        assert easy.decision.data_left_site and easy.decision.cost.cloud_micros == 1500
        hard = await mesh.stub.Infer(router_request(IMAGES[HARD[0] : HARD[0] + 1]), timeout=5)
        assert hard.decision.served_by == routing_pb2.TIER_CLOUD
        assert hard.decision.reason == decision_pb2.DECISION_REASON_ESCALATED_HARD_CASE
        assert hard.decision.explanation.startswith("hedged")
        sensitive = await mesh.stub.Infer(
            router_request(
                IMAGES[HARD[0] : HARD[0] + 1], privacy=routing_pb2.PRIVACY_CLASS_SENSITIVE
            ),
            timeout=5,
        )
        assert not sensitive.decision.data_left_site  # never hedged out
    finally:
        await stop_mesh(mesh)


async def test_a_colocated_edge_runs_in_the_routers_process_with_its_own_span(
    mesh_triton: TritonServer,
) -> None:
    """edge_mode = "in-process": the edge node's code as a library, no gRPC hop, its
    edge.infer span a child of router.decide in the router's own trace."""
    colocated = await start_mesh(mesh_triton.grpc_url, edge_mode="in-process")
    try:
        assert colocated.router.colocated_edge is colocated.edge
        reply = await colocated.stub.Infer(router_request(IMAGES[EASY[0] : EASY[0] + 1]), timeout=5)
        assert reply.decision.served_by == routing_pb2.TIER_EDGE
        assert reply.decision.edge_model.name == "fashion-edge"
        spans = {s.name: s for s in colocated.router_spans.get_finished_spans()}
        edge_span, decide = spans["edge.infer"], spans["router.decide"]
        assert edge_span.parent is not None
        assert edge_span.parent.span_id == decide.context.span_id
        assert not any(name.endswith("EdgeService/Infer") for name in spans)  # no gRPC hop
    finally:
        await stop_mesh(colocated)


async def test_the_served_policys_test_time_view_reaches_its_features_only(
    any_edge_mesh: Mesh,
) -> None:
    """The served fashion-mnist policy declares the hflip view (issue 18): the router asks
    the edge for it, its features use it (a policy of 23 features could not score
    otherwise), the decision names the policy, and the caller never sees the view."""
    assert read_policy_metadata(latest_policy(POLICY_ROOT)).views == ("hflip",)
    for index in EASY[:2] + HARD[:2]:
        reply = await any_edge_mesh.stub.Infer(router_request(IMAGES[index : index + 1]), timeout=5)
        assert reply.decision.policy_version == SERVED_POLICY_VERSION
        assert [tensor.name for tensor in reply.outputs] == ["logits"]
    easy = await any_edge_mesh.stub.Infer(router_request(IMAGES[EASY[0] : EASY[0] + 1]), timeout=5)
    assert easy.decision.served_by == routing_pb2.TIER_EDGE
