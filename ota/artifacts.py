"""Artifact manifests: what an over-the-air update ships, pinned file by file.

An artifact is one version directory: a model version from the model store, or a router
policy version. Its manifest (``artifact.json``, canonical JSON) lists every file with
its size and sha256; the detached signature (``artifact.sig``) signs the manifest's
bytes, so it signs every file. Versions are immutable integers, as in the model store.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from services.errors import clip

ARTIFACT_MANIFEST = "artifact.json"
ARTIFACT_SIGNATURE = "artifact.sig"
ARTIFACT_SCHEMA = "hybridmesh.artifact/v1"
KINDS = ("model", "router-policy")
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class ArtifactError(Exception):
    """A manifest is malformed, or files do not match it."""


@dataclass(frozen=True)
class ArtifactRef:
    """One version of one artifact."""

    kind: str
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.kind} {self.name} v{self.version}"


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative, "/"-separated, no ".." (checked)
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ArtifactManifest:
    kind: str
    name: str
    version: int
    files: tuple[ArtifactFile, ...]
    created: str

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.kind, self.name, self.version)

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_bytes(self) -> bytes:
        """Canonical bytes: the exact payload that is signed and verified."""
        document = {
            "schema": ARTIFACT_SCHEMA,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "files": [
                {"path": f.path, "sha256": f.sha256, "size_bytes": f.size_bytes} for f in self.files
            ],
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    def file(self, path: str) -> ArtifactFile:
        for entry in self.files:
            if entry.path == path:
                return entry
        # The path is the caller's: cut like every echoed caller string.
        raise ArtifactError(f"{self.kind} {self.name} v{self.version} has no file {clip(path)!r}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_identity(kind: str, name: str, version: int) -> None:
    if kind not in KINDS:
        raise ArtifactError(f"kind must be one of {list(KINDS)}, not {clip(kind)!r}")
    if not NAME.fullmatch(name):
        raise ArtifactError(f"name {clip(name)!r} must match {NAME.pattern}")
    if version < 1:
        raise ArtifactError(f"version must be a positive integer, not {version}")


def describe(directory: Path, ref: ArtifactRef) -> ArtifactManifest:
    """The manifest of every regular file under ``directory`` (its own files excluded)."""
    check_identity(ref.kind, ref.name, ref.version)
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative in (ARTIFACT_MANIFEST, ARTIFACT_SIGNATURE):
            continue
        files.append(ArtifactFile(relative, sha256_of(path), path.stat().st_size))
    if not files:
        raise ArtifactError(f"{directory}: no files to publish")
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    return ArtifactManifest(ref.kind, ref.name, ref.version, tuple(files), created)


def _safe_path(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise ArtifactError("file path must be a non-empty string")
    pure = PurePosixPath(raw)
    if pure.is_absolute() or ".." in pure.parts or raw != pure.as_posix():
        raise ArtifactError(f"file path {raw!r} must be relative and normalised")
    return raw


def parse_manifest(data: bytes) -> ArtifactManifest:
    """Parse and check a manifest received from anywhere (it is not trusted yet)."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("schema") != ARTIFACT_SCHEMA:
            raise ArtifactError(f"manifest schema must be {ARTIFACT_SCHEMA}")
        files = []
        for raw in document["files"]:
            sha = str(raw["sha256"])
            size = raw["size_bytes"]
            if not SHA256_HEX.fullmatch(sha) or not isinstance(size, int) or size < 0:
                raise ArtifactError(f"file entry {raw!r} needs a sha256 and a size")
            files.append(ArtifactFile(_safe_path(raw["path"]), sha, size))
        manifest = ArtifactManifest(
            kind=str(document["kind"]),
            name=str(document["name"]),
            version=int(document["version"]),
            files=tuple(files),
            created=str(document.get("created", "")),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"malformed manifest: {error}") from None
    check_identity(manifest.kind, manifest.name, manifest.version)
    if len({f.path for f in manifest.files}) != len(manifest.files) or not manifest.files:
        raise ArtifactError("manifest lists no files, or a file twice")
    return manifest


def verify_files(directory: Path, manifest: ArtifactManifest) -> None:
    """Every listed file is present with its size and sha256; ArtifactError otherwise."""
    for entry in manifest.files:
        path = directory / entry.path
        if not path.is_file():
            raise ArtifactError(f"{entry.path}: missing")
        if path.stat().st_size != entry.size_bytes:
            raise ArtifactError(f"{entry.path}: size differs from the manifest")
        if sha256_of(path) != entry.sha256:
            raise ArtifactError(f"{entry.path}: sha256 differs from the manifest")
