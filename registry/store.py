"""The registry's storage: signed, immutable artifact versions and a promotion history.

Layout: ``<root>/<kind>/<name>/<version>/`` holds the artifact's files beside
``artifact.json`` and ``artifact.sig``; ``<root>/<kind>/<name>/channel.json`` holds the
promotion history (the last entry is what edge sites should run) and the operator-signed
statement (``ota.promotions``) that made it so. Publishing writes a temporary directory
and renames it into place, so a reader never sees half a version.

The store makes no statement itself: ``record`` takes one the operator signed, and keeps
it only when it is the next in sequence and consistent with the history (a promote of a
published version, or a rollback to the previously promoted one).
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
from ota.promotions import Promotion, PromotionError, SignedPromotion
from registry.signing import PublisherKey, sign, sign_promotion
from services.logging import get_logger

CHANNEL_FILE = "channel.json"
MAX_CHUNK_BYTES = 1 << 20

_log = get_logger("registry.store")


class RegistryError(Exception):
    """Not found, already published, or an operation that makes no sense."""


class NotFoundError(RegistryError):
    pass


class StatementError(RegistryError):
    """A promotion statement that is malformed, out of sequence or contradicts the
    history."""


@dataclass(frozen=True)
class Channel:
    """One artifact's promotion history and the statement behind its last entry."""

    history: tuple[int, ...] = ()
    promotion: SignedPromotion | None = None

    @property
    def sequence(self) -> int:
        return self.promotion.promotion.sequence if self.promotion is not None else 0


@dataclass(frozen=True)
class ArtifactSummary:
    kind: str
    name: str
    versions: tuple[int, ...]
    promoted: int | None
    promotion: SignedPromotion | None = None
    previous: int | None = None


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
                    channel = self.channel(kind, name)
                except ArtifactError as error:
                    _log.error(
                        "artifact skipped in the listing", kind=kind, name=name, error=str(error)
                    )
                    continue
                history = channel.history
                found.append(
                    ArtifactSummary(
                        kind,
                        name,
                        self.versions(kind, name),
                        history[-1] if history else None,
                        channel.promotion,
                        history[-2] if len(history) >= 2 else None,
                    )
                )
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
        history = self.channel(kind, name).history
        return history[-1] if history else None

    def promotion(self, kind: str, name: str) -> SignedPromotion | None:
        """The operator-signed statement behind the promoted version, if any."""
        return self.channel(kind, name).promotion

    def previous(self, kind: str, name: str) -> int | None:
        """The version a rollback would promote again."""
        history = self.channel(kind, name).history
        return history[-2] if len(history) >= 2 else None

    def record(self, signed: SignedPromotion) -> Promotion:
        """Apply an operator-signed statement: a promote appends its version to the
        history, a rollback (to the previously promoted version) pops the last one.
        StatementError when it is malformed, not the next in sequence or contradicts the
        history; NotFoundError when its version is not published."""
        if not (signed.statement.isascii() and signed.signature.isascii()):
            raise StatementError("a statement and its signature are ASCII JSON")
        try:
            promotion = signed.promotion
        except PromotionError as error:
            raise StatementError(str(error)) from None
        kind, name, version = promotion.kind, promotion.name, promotion.version
        channel = self.channel(kind, name)
        if promotion.sequence != channel.sequence + 1:
            raise StatementError(
                f"{kind} {name}: statement sequence {promotion.sequence} is not the next "
                f"({channel.sequence + 1})"
            )
        history = list(channel.history)
        if promotion.action == "rollback":
            if len(history) < 2:
                raise StatementError(f"{kind} {name}: no earlier promoted version to roll back to")
            if history[-2] != version:
                raise StatementError(
                    f"{kind} {name}: a rollback goes back to v{history[-2]}, not v{version}"
                )
            history.pop()
        else:
            if version not in self.versions(kind, name):
                raise NotFoundError(f"{kind} {name} v{version} is not published")
            if not history or history[-1] != version:
                history.append(version)
        self._write_channel(kind, name, Channel(tuple(history), signed))
        return promotion

    def promote(self, kind: str, name: str, version: int, key: PublisherKey) -> None:
        """Sign and record the next promote statement (the operator's side, in process)."""
        channel = self.channel(kind, name)
        if channel.history and channel.history[-1] == version and channel.promotion:
            return
        sequence = channel.sequence + 1
        self.record(sign_promotion(key, kind, name, version, sequence, "promote"))

    def rollback(self, kind: str, name: str, key: PublisherKey) -> int:
        """Sign and record a rollback to the previously promoted version; returns it."""
        channel = self.channel(kind, name)
        if len(channel.history) < 2:
            raise StatementError(f"{kind} {name}: no earlier promoted version to roll back to")
        version = channel.history[-2]
        self.record(sign_promotion(key, kind, name, version, channel.sequence + 1, "rollback"))
        return version

    def channel(self, kind: str, name: str) -> Channel:
        path = self._artifact_dir(kind, name) / CHANNEL_FILE
        if not path.exists():
            return Channel()
        try:
            document = json.loads(path.read_text())
            history = tuple(int(v) for v in document["promoted"])
            promotion = None
            if document.get("statement"):
                promotion = SignedPromotion(
                    str(document["statement"]).encode(), str(document["signature"]).encode()
                )
                promotion.promotion  # noqa: B018 (parsed here: a bad one fails the load)
        except (ValueError, KeyError, TypeError, PromotionError) as error:
            raise ArtifactError(f"{path}: malformed ({error})") from None
        if any(version <= 0 for version in history):
            raise ArtifactError(f"{path}: malformed (versions must be positive)")
        return Channel(history, promotion)

    def _write_channel(self, kind: str, name: str, channel: Channel) -> None:
        path = self._artifact_dir(kind, name) / CHANNEL_FILE
        document: dict[str, object] = {"promoted": list(channel.history)}
        if channel.promotion is not None:
            document["statement"] = channel.promotion.statement.decode()
            document["signature"] = channel.promotion.signature.decode()
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document) + "\n")
        os.replace(temporary, path)  # atomic: a reader sees the old or the new channel


class StoreSource:
    """A RegistryStore read in process (the registry service uses the same calls)."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def promotion(self, kind: str, name: str) -> SignedPromotion | None:
        return await asyncio.to_thread(self._store.promotion, kind, name)

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
