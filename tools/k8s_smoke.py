"""make k8s-smoke: run the k8s manifests as committed, with podman (issue 20).

1. Render both overlays with ``kubectl kustomize``.
2. Build each role's image (edge, cloud, registry) from deploy/docker/Dockerfile, offline,
   with tools/image_build.py: a local Debian base made with debootstrap and ``podman
   import`` (cached: built once, reused while the image exists), wheels pre-downloaded
   with pip (cached by the requirements' hash), ``--network=none``.
3. Adapt each tier's rendered workloads for ``podman kube play`` (``adapt``: one comment
   per workaround) and play them: the edge site (router + edge node), then the cloud tier
   (cloud-inference + registry, no Triton).
4. Check: router and edge node SERVING, an Infer answered at the edge, the volumes seeded
   from the image; cloud-inference NOT_SERVING and logging why (Triton), registry SERVING.
5. Tear down, and check that no container, pod, volume or secret of ours is left.

Everything is named ``hybridmesh-smoke*``; nothing else on the machine is touched. The
pods have no network but their own loopback (``--network none``): the checks run inside
them with ``podman exec``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from localmesh.certs import ensure_certificates
from tools.image_build import (
    LOCAL_BASE,
    REPO,
    ROLES,
    build,
    ensure_local_base,
    ensure_wheels,
    run,
)

PREFIX = "hybridmesh-smoke"
# One image per role (tools/image_build.py), tagged for the smoke test only.
IMAGES = {role: f"localhost/{PREFIX}-{role}:latest" for role in ROLES}
CACHE = REPO / ".stamps" / "k8s-smoke"
# Workloads whose images cannot be pulled here (no registry reachable): Envoy, Triton,
# Jaeger, the site's OpenTelemetry Collector. Their configs are validated by the tests.
NOT_RUN_HERE = {"envoy", "triton", "jaeger", "otel-collector"}
# Kinds podman kube play ignores or has no use for on one machine.
IGNORED_KINDS = {
    "Namespace",
    "ServiceAccount",
    "Service",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ConfigMap",
}
# What the smoke test plays (one pod per tier).
WORKLOADS = {"Deployment", "StatefulSet"}
DEADLINE_S = 25 * 60


def log(message: str) -> None:
    sys.stdout.write(f"[k8s-smoke {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


# What kube play has no flags for (it takes no --runtime or --ulimit): the same settings
# as image_build.PODMAN_RUN_OPTIONS, in a containers.conf of our own (CONTAINERS_CONF).
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
"""


def podman(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], **kwargs)


def use_own_containers_conf() -> None:
    path = CACHE / "containers.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONTAINERS_CONF)
    os.environ["CONTAINERS_CONF"] = str(path)


# -- 1. render ------------------------------------------------------------------------


def render(overlay: str) -> list[dict[str, Any]]:
    rendered = run(["kubectl", "kustomize", str(REPO / "deploy/k8s/overlays" / overlay)]).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


# -- 2. build -------------------------------------------------------------------------


def build_images() -> None:
    """Each role's image, offline on the local Debian base (tools/image_build.py)."""
    ensure_local_base("podman")
    wheels = ensure_wheels()
    for role, image in IMAGES.items():
        build("podman", role, image, LOCAL_BASE, wheels)


def role_of(image: str) -> str:
    """The role of a rendered image reference: .../hybridmesh-<role>:<tag> -> <role>."""
    name = image.rsplit("/", 1)[-1].split(":", 1)[0]
    role = name.removeprefix("hybridmesh-")
    if role not in IMAGES:
        raise SystemExit(f"not one of our images: {image}")
    return role


# -- 3. adapt for podman kube play ----------------------------------------------------


def adapt(resources: list[dict[str, Any]], tier: str, hosts: Path) -> str:
    """The tier's workloads as one podman Pod, with each workaround spelled out."""
    deployments = [
        r for r in resources if r["kind"] in WORKLOADS and r["metadata"]["name"] not in NOT_RUN_HERE
    ]
    kinds = {r["kind"] for r in resources} - IGNORED_KINDS - WORKLOADS
    # PersistentVolumeClaims become podman volumes, made by the smoke test itself.
    assert kinds <= {"PersistentVolumeClaim"}, f"unexpected kinds: {kinds}"
    first = deployments[0]["spec"]["template"]["spec"]
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{PREFIX}-{tier}", "labels": {"app.kubernetes.io/part-of": PREFIX}},
        "spec": {
            # One pod per tier: podman has no Services or cluster DNS, so the tier's
            # Deployments share one pod (one network namespace, loopback only) and each
            # Service name resolves to 127.0.0.1 there; ports do not clash. podman 4.3
            # ignores hostAliases in a pod without network: the names are in an
            # /etc/hosts of our own, mounted into every container (below).
            "securityContext": copy.deepcopy(first["securityContext"]),
            # A crash fails the smoke test (its log is shown) instead of restarting.
            "restartPolicy": "Never",
            "containers": [],
            "volumes": [{"name": "hosts", "hostPath": {"path": str(hosts), "type": "File"}}],
        },
    }
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
        # A StatefulSet's volumeClaimTemplates: the claims of its one replica, ordinal 0.
        spec.setdefault("volumes", []).extend(
            {"name": template, "persistentVolumeClaim": {"claimName": claim}}
            for template, claim in _claim_templates(deployment)
        )
        renamed = {}
        for volume in spec.get("volumes", []):
            # Volume names are per pod: prefix them with the Deployment's name.
            renamed[volume["name"]] = volume["name"] = f"{name}-{volume['name']}"
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]
                # Podman volumes are machine-wide: ours carry the smoke prefix.
                claim["claimName"] = f"{PREFIX}-{claim['claimName']}"
            if "secret" in volume:
                # Podman secrets are machine-wide: ours carry the smoke prefix; and
                # podman 4.3 panics on a secret volume without "optional" (nil pointer).
                volume["secret"]["secretName"] = f"{PREFIX}-{volume['secret']['secretName']}"
                volume["secret"]["optional"] = False
            pod["spec"]["volumes"].append(volume)
        for container in spec["containers"]:
            # The role's image built here, not the registry's tag.
            container["image"] = IMAGES[role_of(container["image"])]
            # podman 4.3 knows no grpc probes; the smoke test checks health itself.
            container.pop("readinessProbe", None)
            container.pop("livenessProbe", None)
            # cgroup limits are not delegated to podman in this sandbox.
            container.pop("resources", None)
            # podman turns containerPorts into host port mappings, which a pod with no
            # network cannot have; nothing is published: the checks run inside the pod.
            container.pop("ports", None)
            for mount in container.get("volumeMounts", []):
                mount["name"] = renamed[mount["name"]]
            container.setdefault("volumeMounts", []).append(
                {"name": "hosts", "mountPath": "/etc/hosts", "readOnly": True}
            )
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    ref["name"] = f"{PREFIX}-{ref['name']}"
                # Every service's metrics port is 9464, in a pod of its own in k8s; in the
                # tier's one pod they would clash: each container gets the next one.
                if env["name"].endswith("_METRICS_PORT"):
                    env["value"] = str(int(env["value"]) + len(pod["spec"]["containers"]))
            pod["spec"]["containers"].append(container)
    return str(yaml.safe_dump(pod, sort_keys=False))


def _claim_templates(workload: dict[str, Any]) -> list[tuple[str, str]]:
    """(template, claim) of a StatefulSet's replica 0: Kubernetes names its claims
    ``<template>-<statefulset>-<ordinal>``. Nothing for a Deployment."""
    name = workload["metadata"]["name"]
    return [
        (t["metadata"]["name"], f"{t['metadata']['name']}-{name}-0")
        for t in workload["spec"].get("volumeClaimTemplates", [])
    ]


def claims(resources: list[dict[str, Any]]) -> list[str]:
    """The podman volumes to make: the tier's PersistentVolumeClaims and its
    StatefulSets' claims (replica 0), prefixed."""
    ours = [
        r
        for r in resources
        if r["metadata"].get("labels", {}).get("app.kubernetes.io/name") not in NOT_RUN_HERE
    ]
    names = [r["metadata"]["name"] for r in ours if r["kind"] == "PersistentVolumeClaim"]
    for workload in (r for r in ours if r["kind"] == "StatefulSet"):
        names += [claim for _, claim in _claim_templates(workload)]
    return [f"{PREFIX}-{name}" for name in names]


def create_volumes(names: Sequence[str]) -> None:
    for name in names:
        podman("volume", "create", "--label", f"{PREFIX}=1", name)
        # podman ignores the pod's fsGroup: the volume belongs to the image's user, as
        # fsGroup 10001 makes it in a cluster.
        mountpoint = podman("volume", "inspect", name, "--format", "{{.Mountpoint}}").stdout
        os.chown(mountpoint.strip(), 10001, 10001)


def create_secret(name: str, data: dict[str, bytes], *, for_env: bool = False) -> None:
    """A podman secret that kube play reads as the Kubernetes Secret ``name``. podman 4.3
    takes an env secretKeyRef's as the bare JSON data map (key -> base64), and a secret
    volume's as a Secret object whose data values it writes to the files as they are,
    without base64-decoding them: so those go in as plain text."""
    if for_env:
        secret: dict[str, Any] = {k: base64.b64encode(v).decode() for k, v in data.items()}
    else:
        plain = {key: value.decode() for key, value in data.items()}
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": plain}
    podman("secret", "create", name, "-", input_text=json.dumps(secret))


# -- 4. checks ------------------------------------------------------------------------


def probe(container: str, *args: str) -> dict[str, Any]:
    script = (REPO / "tools/k8s_smoke_probe.py").read_text()
    result = podman("exec", "-i", container, "python", "-", *args, input_text=script, check=False)
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout)[-500:]}
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f}s waiting for: {what}")
        time.sleep(1)


def wait_health(container: str, wanted: dict[str, str], names: str) -> None:
    """Wait until the health of each port (checked from ``container``) is as wanted."""
    state: dict[str, Any] = {}

    def reached() -> bool:
        state.update(probe(container, *wanted))
        return all(state.get(port) == status for port, status in wanted.items())

    wait_for(f"{names}: {wanted}", reached, 90)
    log(f"health of {names}: {', '.join(state[port] for port in wanted)}")


def logs(container: str) -> str:
    result = podman("logs", container, check=False)
    return (result.stdout or "") + (result.stderr or "")


# -- 5. teardown ----------------------------------------------------------------------


def leftovers() -> list[str]:
    found = []
    for kind, command in (
        ("container", ["ps", "-a", "--format", "{{.Names}}"]),
        ("pod", ["pod", "ls", "--format", "{{.Name}}"]),
        ("volume", ["volume", "ls", "--format", "{{.Name}}"]),
        ("secret", ["secret", "ls", "--format", "{{.Name}}"]),
    ):
        names = podman(*command, check=False).stdout.split()
        found += [f"{kind} {n}" for n in names if n.startswith(PREFIX)]
    return found


def teardown(played: Sequence[Path]) -> None:
    for manifest in played:
        podman("kube", "play", "--down", str(manifest), check=False, timeout=120)
    for pod in podman("pod", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        if pod.startswith(PREFIX):
            podman("pod", "rm", "-f", "-t", "15", pod, check=False, timeout=120)
    for volume in podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        if volume.startswith(PREFIX):
            podman("volume", "rm", "-f", volume, check=False)
    for secret in podman("secret", "ls", "--format", "{{.Name}}", check=False).stdout.split():
        if secret.startswith(PREFIX):
            podman("secret", "rm", secret, check=False)


# -- the run --------------------------------------------------------------------------


def hosts_file(work: Path, tier: str, names: Sequence[str]) -> Path:
    hosts = work / f"{tier}-hosts"
    hosts.write_text(f"127.0.0.1 localhost {' '.join(names)}\n")
    hosts.chmod(0o644)
    return hosts


def play(manifest: Path, yaml_text: str, played: list[Path]) -> None:
    manifest.write_text(yaml_text)
    played.append(manifest)
    # No network but the pod's own loopback: nothing here is reachable from outside.
    podman("kube", "play", "--network", "none", str(manifest), timeout=180)


def edge_site(resources: list[dict[str, Any]], work: Path, played: list[Path]) -> None:
    create_volumes(claims(resources))
    create_secret(f"{PREFIX}-cloud-site-token", {"token": b"smoke-site-token"}, for_env=True)
    # The site's client certificate, made here (localmesh's CA); the cloud address in
    # the overlay does not resolve here, so the site runs with its cloud unreachable.
    certificates = ensure_certificates(work / "certs").directory
    create_secret(
        f"{PREFIX}-cloud-client-tls",
        {
            "ca.crt": (certificates / "ca.crt").read_bytes(),
            "tls.crt": (certificates / "client.crt").read_bytes(),
            "tls.key": (certificates / "client.key").read_bytes(),
        },
    )
    create_secret(f"{PREFIX}-operator-public-key", {"publisher.pub": _public_key()})
    hosts = hosts_file(work, "edge", ["edge-node", "otel-collector"])
    play(work / "edge.yaml", adapt(resources, "edge", hosts), played)
    router, node = f"{PREFIX}-edge-router", f"{PREFIX}-edge-edge-node"
    wait_health(router, {"50051": "SERVING", "50052": "SERVING"}, "router, edge node")
    answer = probe(router, "--infer=50051")["infer"]
    log(f"edge site: Infer through the router (EDGE_ONLY, 4 images): {answer}")
    if answer.get("served_by") != ["TIER_EDGE"] or answer.get("data_left_site"):
        raise SystemExit(f"the edge did not answer: {answer}")
    node_log, router_log = logs(node), logs(router)
    for needle, text in (
        ("model store seeded from the image", node_log),
        ("models loaded", node_log),
        ("router policy seeded from the image", router_log),
    ):
        if needle not in text:
            raise SystemExit(f"missing from the logs: {needle!r}\n{text[-3000:]}")
    log("edge site: store and policy roots seeded from the image; models loaded")
    wait_for("the edge node polling the registry", lambda: "update poll" in logs(node), 30)
    log("edge site: the edge node polls the registry (unreachable here, as the cloud is)")
    if "home" in (node_log + router_log).lower():  # issue 20 #8: HOME=/tmp in the image
        raise SystemExit("a line about a home directory in the logs")


def cloud_tier(resources: list[dict[str, Any]], work: Path, played: list[Path]) -> None:
    create_volumes(claims(resources))
    digest = hashlib.sha256(b"smoke-site-token").hexdigest()
    create_secret(
        f"{PREFIX}-cloud-site-tokens",
        {"site-tokens.json": json.dumps({"site-001": digest}).encode()},
    )
    # The registry serves mTLS only (localmesh's CA and server certificate here); its
    # plaintext probe port (50055) is what the kubelet, and this check, ask.
    certificates = ensure_certificates(work / "certs").directory
    create_secret(
        f"{PREFIX}-registry-tls",
        {
            "ca.crt": (certificates / "ca.crt").read_bytes(),
            "tls.crt": (certificates / "server.crt").read_bytes(),
            "tls.key": (certificates / "server.key").read_bytes(),
        },
    )
    hosts = hosts_file(work, "cloud", ["triton", "jaeger"])
    play(work / "cloud.yaml", adapt(resources, "cloud", hosts), played)
    cloud, registry = f"{PREFIX}-cloud-cloud-inference", f"{PREFIX}-cloud-registry"
    wait_health(registry, {"50053": "NOT_SERVING", "50055": "SERVING"}, "cloud-inference, registry")
    wait_for("cloud-inference's reason", lambda: '"not serving"' in logs(cloud), 30)
    reason = next(line for line in logs(cloud).splitlines() if '"not serving"' in line)
    log(f"cloud tier: cloud-inference says: {reason[:300]}")


def _public_key() -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the pods up (debugging)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    for tool in ("kubectl", "podman"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required (apt-get install podman debootstrap)")
    use_own_containers_conf()
    edge, cloud = render("edge"), render("cloud")
    log(f"rendered: edge {len(edge)} resources, cloud {len(cloud)} resources")
    if leftovers():
        log(f"removing leftovers of an earlier run: {leftovers()}")
        teardown([])
    build_images()
    played: list[Path] = []
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-") as directory:
        work = Path(directory)
        try:
            edge_site(edge, work, played)
            cloud_tier(cloud, work, played)
        except BaseException:
            for name in podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split():
                if name.startswith(PREFIX):
                    sys.stdout.write(f"--- last lines of {name}:\n{logs(name)[-2000:]}\n")
            raise
        finally:
            if not args.keep:
                teardown(played)
    if not args.keep:
        left = leftovers()
        if left:
            raise SystemExit(f"teardown left: {left}")
        log("teardown: no container, pod, volume or secret left")
    elapsed = time.monotonic() - started
    if elapsed > DEADLINE_S:
        raise SystemExit(f"took {elapsed:.0f}s, over the {DEADLINE_S}s budget")
    log(f"passed in {elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
