"""make k8s-smoke's adapter (tools/k8s_smoke.py): what it changes in the rendered edge
overlay for podman kube play, and what it keeps. The smoke test itself needs podman and
runs outside the suite (README, Deploying)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.helpers.kustomize import build
from tests.helpers.paths import REPO
from tools.k8s_smoke import IMAGES, PREFIX, adapt, claims


def test_the_edge_site_becomes_one_pod_with_each_workaround(tmp_path: Path) -> None:
    rendered = build(REPO / "deploy/k8s/overlays/edge")
    pod = yaml.safe_load(adapt(rendered, "edge", tmp_path / "hosts"))
    spec = pod["spec"]
    assert pod["kind"] == "Pod" and pod["metadata"]["name"] == f"{PREFIX}-edge"
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"router", "edge-node"}  # not the collector (no image here)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"]:
        assert container["image"] == IMAGES["edge"]  # router and edge node: the edge image
        assert not {"readinessProbe", "livenessProbe", "ports", "resources"} & set(container)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True  # kept
        assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
    for volume in volumes.values():
        if "secret" in volume:
            assert volume["secret"]["secretName"].startswith(PREFIX)
            assert volume["secret"]["optional"] is False
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims(rendered)
    # The router's StatefulSet claim of replica 0 (Kubernetes' <template>-<name>-<ordinal>).
    assert sorted(claims(rendered)) == [f"{PREFIX}-edge-model-store", f"{PREFIX}-outbox-router-0"]
    router_env = {e["name"]: e for e in containers["router"]["env"]}
    token = router_env["HYBRIDMESH_ROUTER_CLOUD_SITE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["name"] == f"{PREFIX}-cloud-site-token"
    # Settings are the overlay's, untouched: the edge node seeds and serves the edge model.
    node_env = {e["name"]: e.get("value") for e in containers["edge-node"]["env"]}
    assert node_env["HYBRIDMESH_EDGE_SEED_STORE"] == "/app/models/store"
    assert node_env["HYBRIDMESH_EDGE_SERVED_MODELS"] == '["fashion-edge"]'
    # One pod, one network namespace: the services' metrics ports (9464 each in k8s) differ.
    ports = [
        env["value"]
        for container in spec["containers"]
        for env in container["env"]
        if env["name"].endswith("_METRICS_PORT")
    ]
    assert len(ports) == len(set(ports)) == 2


def test_the_cloud_tier_runs_each_service_on_its_roles_image(tmp_path: Path) -> None:
    rendered = build(REPO / "deploy/k8s/overlays/cloud")
    pod = yaml.safe_load(adapt(rendered, "cloud", tmp_path / "hosts"))
    images = {c["name"]: c["image"] for c in pod["spec"]["containers"]}
    assert images == {"cloud-inference": IMAGES["cloud"], "registry": IMAGES["registry"]}
