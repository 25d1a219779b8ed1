"""deploy/k8s: every overlay, and every component on its own, builds with kustomize and
validates offline (strict), and the manifests keep the properties operators rely on. No
cluster runs here (no k3s): this checks the manifests, not a deployment."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from localmesh.certs import ensure_certificates
from localmesh.envoy import ENVOY_BINARY
from tests.helpers.kustomize import build

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = sorted(p for p in (REPO / "deploy/k8s/overlays").iterdir() if p.is_dir())
OUR_SERVICES = {"router", "edge-node", "cloud-inference", "registry"}
COMPONENTS = sorted(p for p in (REPO / "deploy/k8s/components").iterdir() if p.is_dir())
# The bases each component is built over on its own (its patches' targets).
COMPONENT_BASES = {
    "cloud-mtls": ["router"],
    "ota-updates": ["router", "edge-node"],
    "tracing": ["router", "edge-node", "cloud-inference", "registry"],
    "otel-collector": ["router", "edge-node"],
    "jaeger": [],
}


@pytest.fixture(scope="module", params=OVERLAYS, ids=[p.name for p in OVERLAYS])
def resources(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    overlay: Path = request.param
    return build(overlay)


def _deployments(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workloads: Deployments, and the router's StatefulSet."""
    return [r for r in resources if r["kind"] in {"Deployment", "StatefulSet"}]


def _container(resources: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (deployment,) = (d for d in _deployments(resources) if d["metadata"]["name"] == name)
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, str | None]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env: {names}"
    return {e["name"]: e.get("value") for e in container.get("env", [])}


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
        # Each overlay's collector: Jaeger in the cloud, the site's collector at the edge.
        collector = {d["metadata"]["name"] for d in _deployments(resources)} & {
            "jaeger",
            "otel-collector",
        }
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{collector.pop()}:4317"


def test_labels_and_no_committed_secrets(resources: list[dict[str, Any]]) -> None:
    for resource in resources:
        labels = resource["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "hybridmesh", resource["metadata"]
        assert resource["kind"] != "Secret", "secrets are created by the operator"


def test_edge_overlay_has_edge_parts_only() -> None:
    edge = {d["metadata"]["name"] for d in _deployments(build(REPO / "deploy/k8s/overlays/edge"))}
    cloud = {d["metadata"]["name"] for d in _deployments(build(REPO / "deploy/k8s/overlays/cloud"))}
    assert edge == {"router", "edge-node", "otel-collector"}
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
        # Besides the cluster's monitoring on the metrics port (tests/test_deploy_metrics.py).
        (rule,) = [
            r for r in policies[name]["spec"]["ingress"] if "namespaceSelector" not in str(r)
        ]
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


def test_every_component_has_a_readme_and_is_built_here() -> None:
    assert {p.name for p in COMPONENTS} == set(COMPONENT_BASES)
    for component in COMPONENTS:
        assert (component / "README.md").is_file(), component.name
        kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component", component.name


@pytest.mark.parametrize("component", COMPONENTS, ids=[p.name for p in COMPONENTS])
def test_each_component_builds_on_its_own_and_validates(component: Path, tmp_path: Path) -> None:
    """A component over just the bases it patches: it builds (a patch whose target is
    missing fails the build), validates strictly, and every pod mounts only volumes it
    declares, once each."""
    relative = Path(os.path.relpath(REPO / "deploy/k8s", tmp_path))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(relative / "base" / base) for base in COMPONENT_BASES[component.name]],
        "components": [str(relative / "components" / component.name)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    resources = build(tmp_path)
    assert resources
    for resource in resources:
        kubernetes_validate.validate(resource, "1.32", strict=True)
    for deployment in _deployments(resources):
        pod = deployment["spec"]["template"]["spec"]
        volumes = [v["name"] for v in pod.get("volumes", [])]
        volumes += [
            t["metadata"]["name"] for t in deployment["spec"].get("volumeClaimTemplates", [])
        ]
        assert len(volumes) == len(set(volumes)), volumes
        for container in pod["containers"]:
            mounts = [m["name"] for m in container.get("volumeMounts", [])]
            assert len(mounts) == len(set(mounts)), mounts
            assert set(mounts) <= set(volumes), deployment["metadata"]["name"]
            _env(container)


def _mounts(resources: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """The container's mount paths -> the pod volume mounted there."""
    (deployment,) = (d for d in _deployments(resources) if d["metadata"]["name"] == name)
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    # A StatefulSet's volumeClaimTemplates: a claim per replica, mounted by the template's name.
    for template in deployment["spec"].get("volumeClaimTemplates", []):
        name = template["metadata"]["name"]
        volumes[name] = {"name": name, "persistentVolumeClaim": {"claimName": name}}
    return {m["mountPath"]: volumes[m["name"]] for m in pod["containers"][0]["volumeMounts"]}


def _volume_under(mounts: dict[str, dict[str, Any]], path: str) -> dict[str, Any]:
    (volume,) = (v for mount, v in mounts.items() if Path(path).is_relative_to(mount))
    return volume


def test_edge_site_settings_point_at_mounted_volumes() -> None:
    """The edge overlay's cloud and update settings: TLS directories and trusted keys
    are the mounted secrets, download staging is on a persistent volume, both services
    poll the same registry, and the edge node serves the catalog's edge models only."""
    edge = build(REPO / "deploy/k8s/overlays/edge")
    router, node = _env(_container(edge, "router")), _env(_container(edge, "edge-node"))
    router_mounts, node_mounts = _mounts(edge, "router"), _mounts(edge, "edge-node")
    assert router["HYBRIDMESH_ROUTER_CLOUD_TARGET"] == router["HYBRIDMESH_ROUTER_REGISTRY_TARGET"]
    assert router["HYBRIDMESH_ROUTER_REGISTRY_TARGET"] == node["HYBRIDMESH_EDGE_REGISTRY_TARGET"]
    for env, mounts, prefix in (
        (router, router_mounts, "HYBRIDMESH_ROUTER_"),
        (node, node_mounts, "HYBRIDMESH_EDGE_"),
    ):
        for setting in ("REGISTRY_TLS_DIR", "CLOUD_TLS_DIR"):
            if prefix + setting in env:
                tls = _volume_under(mounts, str(env[prefix + setting]))
                assert tls["secret"]["secretName"] == "cloud-client-tls"
        for key in json.loads(str(env[prefix + "TRUSTED_KEYS"])):
            assert _volume_under(mounts, key)["secret"]["secretName"] == "operator-public-key"
        staging = "POLICY_UPDATE_STAGING" if prefix == "HYBRIDMESH_ROUTER_" else "UPDATE_STAGING"
        assert "persistentVolumeClaim" in _volume_under(mounts, str(env[prefix + staging]))
    assert "persistentVolumeClaim" in _volume_under(
        node_mounts, str(node["HYBRIDMESH_EDGE_MODEL_STORE"])
    )
    catalog = tomllib.loads((REPO / "models/catalog.toml").read_text())
    edge_models = {pair["edge_model"] for pair in catalog["pairs"].values()}
    assert set(json.loads(str(node["HYBRIDMESH_EDGE_SERVED_MODELS"]))) == edge_models
    assert node["HYBRIDMESH_EDGE_SITE_ID"]


def _secret_commands(text: str) -> set[str]:
    """The ``kubectl ... create secret`` commands in a README or a YAML header, with
    comment markers, line continuations and trailing comments removed."""
    lines = [re.sub(r"^\s*#?\s*", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    commands = set()
    for line in joined.splitlines():
        if re.match(r"kubectl .*create secret ", line):
            commands.add(" ".join(line.split(" #")[0].split()))
    return commands


def _referenced_secrets(resources: list[dict[str, Any]]) -> set[str]:
    names = set()
    for deployment in _deployments(resources):
        pod = deployment["spec"]["template"]["spec"]
        names |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        for container in pod["containers"]:
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    names.add(env["valueFrom"]["secretKeyRef"]["name"])
    return names


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_one_secret_recipe_in_readme_and_overlay_header(overlay: Path) -> None:
    """The overlay's header and the README create the same secrets the same way, and
    those are exactly the secrets the rendered overlay references."""
    namespace = yaml.safe_load((overlay / "kustomization.yaml").read_text())["namespace"]
    header = _secret_commands((overlay / "kustomization.yaml").read_text())
    readme = {
        command
        for command in _secret_commands((REPO / "README.md").read_text())
        if f" -n {namespace} " in command
    }
    assert header
    assert header == readme
    # "kubectl -n <namespace> create secret <type> <name> ...": the name.
    created = {command.split(" create secret ")[1].split()[1] for command in header}
    assert created == _referenced_secrets(build(overlay))


def test_the_site_collector_forwards_over_the_sites_mtls_link() -> None:
    """The edge collector's pipeline uses only components it defines, listens where its
    Service points, and exports to the cloud address with the mounted client certificate."""
    edge = build(REPO / "deploy/k8s/overlays/edge")
    (config_map,) = (r for r in edge if r["metadata"]["name"].startswith("otel-collector-"))
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    service = config["service"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(service["pipelines"]["traces"][kind]) <= set(config[kind]), kind
    assert set(service["extensions"]) <= set(config["extensions"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    exporter = config["exporters"]["otlp/cloud"]
    router = _env(_container(edge, "router"))
    assert exporter["endpoint"] == router["HYBRIDMESH_ROUTER_CLOUD_TARGET"]
    mounts = _mounts(edge, "otel-collector")
    for key in ("ca_file", "cert_file", "key_file"):
        tls = _volume_under(mounts, exporter["tls"][key])
        assert tls["secret"]["secretName"] == "cloud-client-tls"
    container = _container(edge, "otel-collector")
    assert container["args"] == [f"--config={next(iter(mounts))}/config.yaml"]
    assert (
        _volume_under(mounts, "/etc/otelcol/config.yaml")["configMap"]["name"]
        == (config_map["metadata"]["name"])
    )


def test_a_site_seeds_its_volumes_from_the_image() -> None:
    """The edge store and the router's policy roots live on the PVCs, seeded from what
    the image ships (/app/models), so over-the-air updates can install beside them."""
    edge = build(REPO / "deploy/k8s/overlays/edge")
    node, router = _env(_container(edge, "edge-node")), _env(_container(edge, "router"))
    assert node["HYBRIDMESH_EDGE_SEED_STORE"] == "/app/models/store"
    assert router["HYBRIDMESH_ROUTER_POLICIES_SEED"] == "/app/models/policies"
    policies = _volume_under(_mounts(edge, "router"), str(router["HYBRIDMESH_ROUTER_POLICIES_DIR"]))
    assert "persistentVolumeClaim" in policies
    assert (REPO / "models/store/fashion-edge").is_dir() and (REPO / "models/policies").is_dir()


def test_each_router_replica_has_its_own_outbox_volume() -> None:
    """The autoscaled router is a StatefulSet: every path it writes (outbox, audit log,
    policies, policy downloads) is on its per-replica claim, none on a shared PVC, and
    the autoscaler scales that StatefulSet."""
    edge = build(REPO / "deploy/k8s/overlays/edge")
    (router,) = (d for d in _deployments(edge) if d["metadata"]["name"] == "router")
    assert router["kind"] == "StatefulSet"
    assert router["spec"]["serviceName"] in {
        r["metadata"]["name"] for r in edge if r["kind"] == "Service"
    }
    (template,) = router["spec"]["volumeClaimTemplates"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    claims = [r["metadata"]["name"] for r in edge if r["kind"] == "PersistentVolumeClaim"]
    assert not [c for c in claims if c.startswith("router")], claims
    env, mounts = _env(_container(edge, "router")), _mounts(edge, "router")
    for setting in ("OUTBOX_PATH", "AUDIT_LOG_PATH", "POLICIES_DIR", "POLICY_UPDATE_STAGING"):
        volume = _volume_under(mounts, str(env[f"HYBRIDMESH_ROUTER_{setting}"]))
        assert volume["persistentVolumeClaim"]["claimName"] == template["metadata"]["name"]
    (autoscaler,) = (r for r in edge if r["kind"] == "HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"


def test_the_registry_records_only_promotions_signed_by_the_operator_key() -> None:
    """The registry's trusted keys are the mounted operator-public-key secret, the same
    secret the sites verify with."""
    cloud = build(REPO / "deploy/k8s/overlays/cloud")
    env = _env(_container(cloud, "registry"))
    keys = json.loads(str(env["HYBRIDMESH_REGISTRY_TRUSTED_KEYS"]))
    assert keys
    for key in keys:
        volume = _volume_under(_mounts(cloud, "registry"), key)
        assert volume["secret"]["secretName"] == "operator-public-key"
