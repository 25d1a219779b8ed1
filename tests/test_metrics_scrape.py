"""Prometheus /metrics on every service of the real local mesh: after traffic (easy and
hard images, an EDGE_ONLY and a CLOUD_ONLY request, a bad request), each endpoint
named in state.json answers with the standard RPC metric and the service's own
metrics, with plausible values; and the Grafana dashboard (deploy/grafana) queries only
metrics, labels and label values the services export."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from hybridmesh.cloud.v1 import cloud_service_pb2, cloud_service_pb2_grpc
from hybridmesh.common.v1 import routing_pb2
from hybridmesh.router.v1 import router_service_pb2_grpc
from localmesh.launcher import LocalMesh, MeshOptions, MeshState
from tests.helpers.item_difficulty import easy_and_hard
from tests.helpers.requests import router_request
from workload.fashion_mnist import load_split

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]
REPO = Path(__file__).resolve().parent.parent
IMAGES = load_split("test").images[:300]
EASY, HARD = easy_and_hard(IMAGES, 3)

Samples = dict[str, list[tuple[dict[str, str], float]]]
DASHBOARD = REPO / "deploy/grafana/hybridmesh.json"
# PromQL words that look like names: aggregation modifiers, operators, histogram's le.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_WORDS |= {"and", "or", "unless", "offset", "le", "e"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MeshState]:
    mesh = LocalMesh(
        MeshOptions(
            state_dir=tmp_path_factory.mktemp("metrics-mesh"),
            repository_root=REPO,
            random_ports=True,
        )
    )
    state = await mesh.up()
    async with grpc.aio.insecure_channel(state.endpoints["router"]) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        for index in [*EASY, *HARD]:
            await stub.Infer(router_request(IMAGES[index : index + 1]), timeout=10)
        await stub.Infer(
            router_request(IMAGES[:1], preference=routing_pb2.ROUTE_PREFERENCE_EDGE_ONLY),
            timeout=10,
        )
        await stub.Infer(
            router_request(IMAGES[:1], preference=routing_pb2.ROUTE_PREFERENCE_CLOUD_ONLY),
            timeout=10,
        )
        bad = router_request(IMAGES[:1])
        bad.model = "no-such-pair"
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Infer(bad, timeout=10)
    # A caller without the site token, straight at the cloud service: refused, and counted.
    async with grpc.aio.insecure_channel(state.endpoints["cloud"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cloud_service_pb2_grpc.CloudServiceStub(channel).Infer(
                cloud_service_pb2.InferRequest(), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    yield state
    await mesh.down()


async def scrape(url: str) -> Samples:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            text: str = reply.read().decode()
            return text

    samples: Samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    assert name in samples, sorted(samples)
    return sum(
        value
        for found, value in samples[name]
        if all(found.get(key) == wanted for key, wanted in labels.items())
    )


def rpc_calls(samples: Samples, service: str, method: str, code: int = 0) -> float:
    return total(
        samples,
        "rpc_server_call_duration_seconds_count",
        rpc_service=service,
        rpc_method=method,
        rpc_grpc_status_code=str(code),
    )


async def test_state_names_a_metrics_endpoint_per_service(running: MeshState) -> None:
    assert sorted(running.metrics) == ["cloud", "edge", "registry", "router"]
    ports = {url.rsplit(":", 1)[1] for url in running.metrics.values()}
    assert len(ports) == 4


async def test_router_metrics(running: MeshState) -> None:
    samples = await scrape(running.metrics["router"])
    router = "hybridmesh.router.v1.RouterService"
    assert rpc_calls(samples, router, "Infer") == 8
    assert rpc_calls(samples, router, "Infer", grpc.StatusCode.NOT_FOUND.value[0]) == 1
    assert total(samples, "rpc_server_call_duration_seconds_sum", rpc_method="Infer") > 0
    requests = "hybridmesh_router_requests_total"
    assert total(samples, requests) == 8
    assert total(samples, requests, served_by="TIER_CLOUD") >= 3  # the hard ones + CLOUD_ONLY
    assert total(samples, requests, reason="DECISION_REASON_EDGE_CONFIDENT") >= 1
    assert total(samples, requests, reason="DECISION_REASON_PREFERENCE_EDGE_ONLY") == 1
    assert total(samples, requests, reason="DECISION_REASON_PREFERENCE_CLOUD_ONLY") == 1
    share = total(samples, "hybridmesh_router_cloud_share")
    assert 0.3 <= share <= 0.7, share
    cost = next(name for name in samples if name.startswith("hybridmesh_router_cost"))
    saved = next(name for name in samples if name.startswith("hybridmesh_router_saved"))
    assert total(samples, cost) > 0 and total(samples, saved) > 0
    assert total(samples, "hybridmesh_router_latency_seconds_count") == 8
    assert total(samples, "hybridmesh_router_tier_duration_seconds_count", tier="cloud") >= 4
    assert total(samples, "hybridmesh_router_tier_duration_seconds_count", tier="edge") >= 6
    assert total(samples, "hybridmesh_router_breaker_state", target="cloud") == 0  # closed
    assert total(samples, "hybridmesh_router_breaker_state", target="edge") == 0
    assert total(samples, "hybridmesh_outbox_depth") == 0
    assert "hybridmesh_outbox_oldest_age_seconds" in samples
    assert total(samples, "hybridmesh_router_admission_queued") == 0
    assert total(samples, "hybridmesh_router_admission_in_flight") == 0
    (labels, value), *_ = samples["hybridmesh_router_policy_info"]
    assert value == 1 and labels["pair"] == "fashion-mnist" and labels["version"]


async def test_edge_metrics(running: MeshState) -> None:
    samples = await scrape(running.metrics["edge"])
    assert rpc_calls(samples, "hybridmesh.edge.v1.EdgeService", "Infer") >= 7
    count = total(samples, "hybridmesh_edge_inference_duration_seconds_count", model="fashion-edge")
    assert count >= 7
    mean = total(samples, "hybridmesh_edge_inference_duration_seconds_sum") / count
    assert 0 < mean < 0.5, mean
    (labels, value), *_ = samples["hybridmesh_edge_model_info"]
    assert value == 1 and labels["model"] == "fashion-edge" and labels["version"]
    assert total(samples, "hybridmesh_edge_admission_queued") == 0


async def test_cloud_metrics(running: MeshState) -> None:
    samples = await scrape(running.metrics["cloud"])
    assert rpc_calls(samples, "hybridmesh.cloud.v1.CloudService", "Infer") >= 4
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert rpc_calls(samples, "hybridmesh.cloud.v1.CloudService", "Infer", unauthenticated) == 1
    count = total(
        samples, "hybridmesh_cloud_inference_duration_seconds_count", model="fashion-cloud"
    )
    assert count >= 4
    mean = total(samples, "hybridmesh_cloud_inference_duration_seconds_sum") / count
    assert 0 < mean < 1, mean
    (labels, value), *_ = samples["hybridmesh_cloud_model_info"]
    assert value == 1 and labels["model"] == "fashion-cloud" and labels["version"]
    assert total(samples, "hybridmesh_cloud_admission_in_flight") == 0


async def test_registry_metrics(running: MeshState) -> None:
    samples = await scrape(running.metrics["registry"])
    # The site's edge node and router poll it for updates and report what they serve.
    calls = total(
        samples,
        "rpc_server_call_duration_seconds_count",
        rpc_service="hybridmesh.registry.v1.RegistryService",
    )
    assert calls >= 1
    assert "hybridmesh_registry_sites_serving" in samples


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def parse_query(expr: str) -> tuple[set[str], list[tuple[str, str, str, str]], set[str]]:
    """A dashboard query's metric names, its matchers (metric, label, operator, value)
    and its grouping labels (``by (...)``). Enough PromQL for our queries: ranges,
    Grafana variables and function calls are skipped."""
    text = re.sub(r"\[[^\]]*\]", "", expr)
    grouping = {
        label.strip()
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text)
        for label in clause.split(",")
    }
    text = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", text)
    matchers = [
        (metric, label, operator, value)
        for metric, body in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", text)
        for label, operator, value in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', body)
    ]
    text = re.sub(r"\{[^}]*\}", "", text)
    names = {
        name
        for name in re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
        if name not in PROMQL_WORDS
    }
    return names, matchers, grouping


async def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    queried = set().union(*(parse_query(expr)[0] for expr in dashboard_queries()))
    # The main figures (issue 19): tiers and reasons, cloud share, cost and saving,
    # breakers, outbox depth and age, edge/cloud latency, admission queues.
    assert {
        "hybridmesh_router_requests_total",
        "hybridmesh_router_items_total",
        "hybridmesh_router_cost_uUSD_total",
        "hybridmesh_router_saved_uUSD_total",
        "hybridmesh_router_breaker_state",
        "hybridmesh_outbox_depth",
        "hybridmesh_outbox_oldest_age_seconds",
        "hybridmesh_router_tier_duration_seconds_bucket",
        "hybridmesh_router_admission_queued",
    } <= queried


async def test_the_dashboard_queries_what_the_services_export(running: MeshState) -> None:
    """Every metric a dashboard query names is in some service's scrape after traffic;
    every label it matches or groups by is on that metric's samples, and every value it
    matches exactly is one of theirs (``le`` is the histograms')."""
    exported: Samples = {}
    for url in running.metrics.values():
        for name, found in (await scrape(url)).items():
            exported.setdefault(name, []).extend(found)
    for expr in dashboard_queries():
        names, matchers, grouping = parse_query(expr)
        assert names, expr
        assert names <= set(exported), (expr, sorted(names - set(exported)))
        labels = {key for name in names for found, _ in exported[name] for key in found}
        assert grouping <= labels | {"le"}, (expr, grouping - labels)
        for metric, label, operator, value in matchers:
            values = {found.get(label) for found, _ in exported[metric]}
            assert values - {None}, (expr, label)
            if operator == "=":
                assert value in values, (expr, label, value, values)
