"""deploy/k8s: every overlay builds with kustomize and validates offline (strict), and
the manifests keep the properties operators rely on. No cluster runs here (no k3s):
this checks the manifests, not a deployment."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from localmesh.certs import ensure_certificates
from localmesh.envoy import ENVOY_BINARY

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = sorted(p for p in (REPO / "deploy/k8s/overlays").iterdir() if p.is_dir())
OUR_SERVICES = {"router", "edge-node", "cloud-inference", "registry"}


def build(overlay: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is required to build the overlays"
    rendered = subprocess.run(
        [kubectl, "kustomize", str(overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


@pytest.fixture(scope="module", params=OVERLAYS, ids=[p.name for p in OVERLAYS])
def resources(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    overlay: Path = request.param
    return build(overlay)


def _deployments(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == "Deployment"]


def test_both_overlays_exist() -> None:
    assert {p.name for p in OVERLAYS} == {"edge", "cloud"}


def test_every_resource_validates_strictly(resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        kubernetes_validate.validate(resource, "1.32", strict=True)


def test_containers_are_locked_down(resources: list[dict[str, Any]]) -> None:
    for deployment in _deployments(resources):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            security = container["securityContext"]
            name = deployment["metadata"]["name"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert "limits" in container["resources"], name


def test_our_services_use_native_grpc_probes_and_trace(resources: list[dict[str, Any]]) -> None:
    ours = [d for d in _deployments(resources) if d["metadata"]["name"] in OUR_SERVICES]
    assert ours
    for deployment in ours:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert "grpc" in container["readinessProbe"]
        assert container["livenessProbe"]["grpc"]["service"] == "liveness"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"


def test_labels_and_no_committed_secrets(resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        labels = resource["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "hybridmesh", resource["metadata"]
        assert resource["kind"] != "Secret", "secrets are created by the operator"


def test_edge_overlay_has_edge_parts_only() -> None:
    edge = {d["metadata"]["name"] for d in _deployments(build(REPO / "deploy/k8s/overlays/edge"))}
    cloud = {d["metadata"]["name"] for d in _deployments(build(REPO / "deploy/k8s/overlays/cloud"))}
    assert edge == {"router", "edge-node"}
    assert cloud == {"envoy", "cloud-inference", "triton", "jaeger", "registry"}


def test_network_policies_and_disruption_budgets() -> None:
    edge = build(REPO / "deploy/k8s/overlays/edge")
    cloud = build(REPO / "deploy/k8s/overlays/cloud")
    policies = {r["metadata"]["name"]: r for r in edge + cloud if r["kind"] == "NetworkPolicy"}
    assert set(policies) == {"router", "edge-node", "cloud-inference", "triton", "registry"}
    # The edge node answers only the router; cloud-inference and the registry only Envoy;
    # Triton only cloud-inference.
    for name, peer in (
        ("edge-node", "router"),
        ("cloud-inference", "envoy"),
        ("registry", "envoy"),
        ("triton", "cloud-inference"),
    ):
        (rule,) = policies[name]["spec"]["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": peer}}}]
    budgets = {r["metadata"]["name"] for r in cloud if r["kind"] == "PodDisruptionBudget"}
    assert budgets == {"envoy", "cloud-inference"}


def test_the_cloud_ingress_config_is_valid_for_the_real_envoy(tmp_path: Path) -> None:
    """The k8s Envoy bootstrap (routes to cloud-inference and the registry, mTLS, access
    log) passes ``envoy --mode validate``, with certificates at the paths it names."""
    certificates = ensure_certificates(tmp_path / "certs").directory
    tls = tmp_path / "tls"
    tls.mkdir()
    for source, target in (
        ("server.crt", "tls.crt"),
        ("server.key", "tls.key"),
        ("ca.crt", "ca.crt"),
    ):
        shutil.copyfile(certificates / source, tls / target)
    text = (REPO / "deploy/k8s/base/envoy/envoy-config.yaml").read_text()
    config = tmp_path / "envoy.yaml"
    config.write_text(text.replace("/etc/envoy/tls/", f"{tls}/"))
    result = subprocess.run(
        [str(ENVOY_BINARY), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "/hybridmesh.registry.v1.RegistryService/" in text
