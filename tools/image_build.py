"""make image: build one image per role with whichever engine is here (docker or podman).

Roles (deploy/docker/Dockerfile's targets, each installing deploy/docker/requirements-<role>.txt):
``edge`` (router + edge node), ``cloud`` (cloud_inference), ``registry``.

Every build is offline, so it runs the same here (no registry reachable) and anywhere:
the wheels are downloaded once by the host's pip (cached by the requirements' hash in
``.stamps/images/wheels``) and copied into a build context made from ``.dockerignore``'s
allowlist; the build runs with ``--network=none``. The base is ``python:3.11-slim-bookworm``
when the engine has it or can pull it, else a Debian bookworm base made once with
debootstrap and imported (``localhost/hybridmesh-base:bookworm``, reused while it exists).
``tools/k8s_smoke.py`` builds its images with the same functions.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROLES = ("edge", "cloud", "registry")
DOCKERFILE = REPO / "deploy/docker/Dockerfile"
CACHE = REPO / ".stamps" / "images"
OFFICIAL_BASE = "docker.io/library/python:3.11-slim-bookworm"
LOCAL_BASE = "localhost/hybridmesh-base:bookworm"
# The Debian packages the local base needs: Python 3.11 (bookworm's), venv, certificates.
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
DEBIAN_MIRROR = os.environ.get("HYBRIDMESH_SMOKE_MIRROR", "http://deb.debian.org/debian")
# podman here: runc (crun is not installed), and ulimits the sandbox allows.
PODMAN_RUN_OPTIONS = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
]


def log(message: str) -> None:
    sys.stdout.write(f"[image {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


def run(
    command: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 600,
    input_text: str | None = None,
    quiet: bool = True,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(command),
        capture_output=quiet,
        text=True,
        timeout=timeout,
        input=input_text,
        check=False,
    )
    if check and result.returncode != 0:
        raise SystemExit(
            f"failed ({result.returncode}): {' '.join(command)}\n"
            f"{(result.stdout or '')[-3000:]}{(result.stderr or '')[-3000:]}"
        )
    return result


def requirements(role: str) -> Path:
    """deploy/docker/requirements-<role>.txt: the role's run-time pins."""
    return REPO / "deploy/docker" / f"requirements-{role}.txt"


def context_paths() -> list[str]:
    """The build context's allowlist: the ``!`` lines of .dockerignore, in order."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line[1:] for line in lines if line.startswith("!")]


def detect_engine() -> str:
    """docker when its daemon answers, else podman; SystemExit when neither is usable."""
    if shutil.which("docker") and run(["docker", "info"], check=False, timeout=30).returncode == 0:
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise SystemExit("neither docker (with a running daemon) nor podman is here")


def engine_options(engine: str) -> list[str]:
    return PODMAN_RUN_OPTIONS if engine == "podman" else []


def ensure_local_base(engine: str, name: str = LOCAL_BASE) -> None:
    """The Debian base ``name``, made once with debootstrap and imported; reused while it
    exists. Needs root and a Debian mirror (HYBRIDMESH_SMOKE_MIRROR)."""
    if run([engine, "image", "inspect", name], check=False).returncode == 0:
        log(f"base image {name}: cached")
        return
    if shutil.which("debootstrap") is None:
        raise SystemExit("no base image can be pulled and debootstrap is missing")
    rootfs = CACHE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    log(f"base image: debootstrap bookworm from {DEBIAN_MIRROR} (a few minutes, once)")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            "bookworm",
            str(rootfs),
            DEBIAN_MIRROR,
        ],
        timeout=900,
    )
    for path in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        shutil.rmtree(rootfs / path, ignore_errors=True)
        (rootfs / path).mkdir(parents=True, exist_ok=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        [engine, "import", "-", name],
        stdin=tar.stdout,
        capture_output=True,
        timeout=600,
        check=False,
    )
    tar.wait(timeout=60)
    if imported.returncode != 0:
        raise SystemExit(f"{engine} import failed: {imported.stderr.decode()[-2000:]}")
    shutil.rmtree(rootfs, ignore_errors=True)


def choose_base(engine: str) -> str:
    """The official Python base when the engine has or can pull it, else the local one."""
    if run([engine, "image", "inspect", OFFICIAL_BASE], check=False).returncode == 0:
        return OFFICIAL_BASE
    if run([engine, "pull", OFFICIAL_BASE], check=False, timeout=300).returncode == 0:
        return OFFICIAL_BASE
    log(f"{OFFICIAL_BASE} cannot be pulled here: a local Debian base instead")
    ensure_local_base(engine)
    return LOCAL_BASE


def ensure_wheels(cache: Path = CACHE) -> Path:
    """Every wheel any role installs, downloaded once per requirements' hash."""
    wheels = cache / "wheels"
    lock = REPO / "requirements.lock"
    files = [lock, *(requirements(role) for role in ROLES)]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    stamp = wheels / ".requirements-sha256"
    if stamp.exists() and stamp.read_text() == key:
        log("wheels: cached")
        return wheels
    shutil.rmtree(wheels, ignore_errors=True)
    log("wheels: pip download (once per requirements change)")
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q"]
    command += ["--only-binary=:all:", "-d", str(wheels), "-c", str(lock)]
    for role in ROLES:
        command += ["-r", str(requirements(role))]
    command.append("setuptools>=68")  # builds the project's own package, offline
    run(command, timeout=900)
    stamp.write_text(key)
    return wheels


def build(engine: str, role: str, tag: str, base: str, wheels: Path) -> int:
    """Build ``role``'s image as ``tag`` with no network; returns its size in bytes."""
    with tempfile.TemporaryDirectory(prefix="hybridmesh-image-context-") as directory:
        context = Path(directory)
        for name in context_paths():
            source = REPO / name
            if name == "wheels":
                shutil.copytree(wheels, context / "wheels")
            elif source.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(source, context / name, ignore=ignore)
            else:
                (context / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, context / name)
        log(f"{role}: {engine} build --network=none -> {tag}")
        run(
            [
                engine,
                "build",
                *engine_options(engine),
                "--network=none",
                "--build-arg",
                f"BASE={base}",
                "--build-arg",
                "PIP_OFFLINE=1",
                "--build-arg",
                f"ROLE={role}",
                "--target",
                role,
                "-f",
                str(context / "deploy/docker/Dockerfile"),
                "-t",
                tag,
                str(context),
            ],
            timeout=1200,
        )
    size = int(run([engine, "image", "inspect", tag, "--format", "{{.Size}}"]).stdout.strip())
    log(f"{role}: {tag} {size / 1e6:.0f} MB")
    return size


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["docker", "podman"], help="default: detected")
    parser.add_argument("--base", help="base image (default: official, else a local one)")
    parser.add_argument(
        "--repository",
        default="ghcr.io/hybridmesh",
        help="images are <repository>/hybridmesh-<role>",
    )
    parser.add_argument("--tag", default="0.1.0", help="the images' tag")
    parser.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES))
    args = parser.parse_args(argv)
    engine = args.engine or detect_engine()
    base = args.base or choose_base(engine)
    wheels = ensure_wheels()
    for role in args.roles:
        build(engine, role, f"{args.repository}/hybridmesh-{role}:{args.tag}", base, wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
