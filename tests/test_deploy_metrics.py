"""deploy/k8s and Prometheus: every service's metrics port is named in its Deployment
and Service and set in its settings, the cluster's monitoring may scrape it and Triton's
metrics (NetworkPolicies), and the router and cloud-inference scale with a
HorizontalPodAutoscaler (validated strictly with the rest by test_deploy_k8s)."""

from __future__ import annotations

from typing import Any

from tests.helpers.kustomize import build
from tests.helpers.paths import REPO

METRICS_PORT = 9464
ENV_PREFIX = {
    "router": "HYBRIDMESH_ROUTER_",
    "edge-node": "HYBRIDMESH_EDGE_",
    "cloud-inference": "HYBRIDMESH_CLOUD_",
    "registry": "HYBRIDMESH_REGISTRY_",
}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def rendered() -> list[dict[str, Any]]:
    return build(REPO / "deploy/k8s/overlays/edge") + build(REPO / "deploy/k8s/overlays/cloud")


def by_kind(resources: list[dict[str, Any]], *kinds: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] in kinds}


def test_every_service_names_its_metrics_port() -> None:
    resources = rendered()
    deployments = by_kind(resources, "Deployment", "StatefulSet")
    services = by_kind(resources, "Service")
    for name, prefix in ENV_PREFIX.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == METRICS_PORT, name
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[f"{prefix}METRICS_PORT"] == str(METRICS_PORT), name
        service_ports = {p["name"]: p for p in services[name]["spec"]["ports"]}
        assert service_ports["metrics"]["targetPort"] == "metrics", name
    triton = {p["name"]: p["port"] for p in services["triton"]["spec"]["ports"]}
    assert triton["metrics"] == 8002


def test_the_clusters_monitoring_may_scrape_every_metrics_port() -> None:
    policies = by_kind(rendered(), "NetworkPolicy")
    for name, port in [*((n, METRICS_PORT) for n in ENV_PREFIX), ("triton", 8002)]:
        rules = [r for r in policies[name]["spec"]["ingress"] if r.get("from") == [MONITORING]]
        assert [r["ports"] for r in rules] == [[{"port": port, "protocol": "TCP"}]], name


def test_router_and_cloud_inference_scale_on_load() -> None:
    resources = rendered()
    autoscalers = by_kind(resources, "HorizontalPodAutoscaler")
    deployments = by_kind(resources, "Deployment", "StatefulSet")
    assert set(autoscalers) == {"router", "cloud-inference"}
    for name, autoscaler in autoscalers.items():
        spec = autoscaler["spec"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": deployments[name]["kind"],
            "name": name,
        }
        assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
        (metric,) = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        # The autoscaler owns the count: an apply must not reset it.
        assert "replicas" not in deployments[name]["spec"], name
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert "cpu" in container["resources"]["requests"], "utilisation needs a request"
    assert autoscalers["cloud-inference"]["spec"]["minReplicas"] >= 2  # its PDB keeps 1
