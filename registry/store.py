"""The registry's storage: signed, immutable artifact versions and a promotion history.

Layout: ``<root>/<kind>/<name>/<version>/`` holds the artifact's files beside
``artifact.json`` and ``artifact.sig``; ``<root>/<kind>/<name>/channel.json`` holds the
promotion history (the last entry is what edge sites should run). Publishing writes a
temporary directory and renames it into place, so a reader never sees half a version.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ota.artifacts import (
    ARTIFACT_MANIFEST,
    ARTIFACT_SIGNATURE,
    ArtifactError,
    ArtifactManifest,
    ArtifactRef,
    check_identity,
    describe,
    parse_manifest,
)
from registry.signing import PublisherKey, sign
from services.logging import get_logger

CHANNEL_FILE = "channel.json"
MAX_CHUNK_BYTES = 1 << 20

_log = get_logger("registry.store")


class RegistryError(Exception):
    """Not found, already published, or an operation that makes no sense."""


class NotFoundError(RegistryError):
    pass


@dataclass(frozen=True)
class ArtifactSummary:
    kind: str
    name: str
    versions: tuple[int, ...]
    promoted: int | None


class RegistryStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _artifact_dir(self, kind: str, name: str) -> Path:
        return self.root / kind / name

    def _version_dir(self, ref: ArtifactRef) -> Path:
        check_identity(ref.kind, ref.name, ref.version)
        return self._artifact_dir(ref.kind, ref.name) / str(ref.version)

    def publish(self, source: Path, ref: ArtifactRef, key: PublisherKey) -> ArtifactManifest:
        """Sign and store ``source`` as an immutable version (it is not promoted)."""
        target = self._version_dir(ref)
        if target.exists():
            raise RegistryError(f"{ref} is already published (versions are immutable)")
        manifest = describe(source, ref)
        payload = manifest.to_bytes()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}-", dir=target.parent))
        try:
            for entry in manifest.files:
                destination = staging / entry.path
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / entry.path, destination)
            (staging / ARTIFACT_MANIFEST).write_bytes(payload)
            (staging / ARTIFACT_SIGNATURE).write_bytes(sign(key, payload))
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def versions(self, kind: str, name: str) -> tuple[int, ...]:
        directory = self._artifact_dir(kind, name)
        if not directory.is_dir():
            return ()
        return tuple(sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()))

    def summaries(self) -> list[ArtifactSummary]:
        """Every artifact; one whose promotion history is damaged is logged and skipped,
        so it cannot break the listing of the others."""
        found = []
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for name_dir in sorted(p for p in kind_dir.iterdir() if p.is_dir()):
                kind, name = kind_dir.name, name_dir.name
                try:
                    promoted = self.promoted(kind, name)
                except ArtifactError as error:
                    _log.error(
                        "artifact skipped in the listing", kind=kind, name=name, error=str(error)
                    )
                    continue
                found.append(ArtifactSummary(kind, name, self.versions(kind, name), promoted))
        return found

    def manifest(self, ref: ArtifactRef) -> tuple[bytes, bytes]:
        """(manifest bytes, signature bytes) of a published version."""
        directory = self._version_dir(ref)
        try:
            return (
                (directory / ARTIFACT_MANIFEST).read_bytes(),
                (directory / ARTIFACT_SIGNATURE).read_bytes(),
            )
        except FileNotFoundError:
            raise NotFoundError(f"{ref} is not published") from None

    def read_chunk(self, ref: ArtifactRef, path: str, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of one listed file (for resumable downloads)."""
        manifest = parse_manifest(self.manifest(ref)[0])
        entry = manifest.file(path)  # only listed files: no path reaches outside
        if offset < 0 or offset > entry.size_bytes:
            raise RegistryError(f"offset {offset} is outside {path} ({entry.size_bytes} bytes)")
        size = max(0, min(size, MAX_CHUNK_BYTES))
        with (self._version_dir(ref) / entry.path).open("rb") as stream:
            stream.seek(offset)
            return stream.read(size)

    def promoted(self, kind: str, name: str) -> int | None:
        history = self._history(kind, name)
        return history[-1] if history else None

    def promote(self, kind: str, name: str, version: int) -> None:
        if version not in self.versions(kind, name):
            raise NotFoundError(f"{kind} {name} v{version} is not published")
        history = self._history(kind, name)
        if history and history[-1] == version:
            return
        self._write_history(kind, name, [*history, version])

    def rollback(self, kind: str, name: str) -> int:
        """Promote the previously promoted version again; returns it."""
        history = self._history(kind, name)
        if len(history) < 2:
            raise RegistryError(f"{kind} {name}: no earlier promoted version to roll back to")
        self._write_history(kind, name, history[:-1])
        return history[-2]

    def _history(self, kind: str, name: str) -> list[int]:
        path = self._artifact_dir(kind, name) / CHANNEL_FILE
        if not path.exists():
            return []
        try:
            history = [int(v) for v in json.loads(path.read_text())["promoted"]]
        except (ValueError, KeyError, TypeError) as error:
            raise ArtifactError(f"{path}: malformed ({error})") from None
        if any(version <= 0 for version in history):
            raise ArtifactError(f"{path}: malformed (versions must be positive)")
        return history

    def _write_history(self, kind: str, name: str, history: list[int]) -> None:
        path = self._artifact_dir(kind, name) / CHANNEL_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"promoted": history}) + "\n")
        os.replace(temporary, path)  # atomic: a reader sees the old or the new history


class StoreSource:
    """A RegistryStore read in process (the registry service uses the same calls)."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def promoted(self, kind: str, name: str) -> int | None:
        return await asyncio.to_thread(self._store.promoted, kind, name)

    async def manifest(self, ref: ArtifactRef) -> tuple[bytes, bytes]:
        return await asyncio.to_thread(self._store.manifest, ref)

    async def stream_file(
        self, ref: ArtifactRef, path: str, offset: int, chunk_bytes: int
    ) -> AsyncIterator[bytes]:
        while chunk := await asyncio.to_thread(
            self._store.read_chunk, ref, path, offset, chunk_bytes
        ):
            yield chunk
            offset += len(chunk)
