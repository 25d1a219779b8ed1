"""A site's download of an update: fetch one artifact version in chunks, resumably, and
verify it.

The signature is checked before any file is fetched (an unsigned or foreign artifact
costs one small request, not a download), and every file's sha256 after. A partial file
(``<path>.part``) survives a crash or a lost link; the next attempt continues from its
size. A file that fails its hash is deleted, so a retry starts clean.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ota.artifacts import (
    ARTIFACT_MANIFEST,
    ARTIFACT_SIGNATURE,
    ArtifactError,
    ArtifactManifest,
    ArtifactRef,
    parse_manifest,
    sha256_of,
    verify_files,
)
from ota.promotions import SignedPromotion
from ota.signatures import verify

CHUNK_BYTES = 256 * 1024
PART_SUFFIX = ".part"


class ArtifactSource(Protocol):
    """Where artifacts come from: the registry service (``ota.registry_client``), or its
    store read in process (``registry.store.StoreSource``)."""

    async def promotion(self, kind: str, name: str) -> SignedPromotion | None:
        """The operator-signed statement of the version sites should run, if any."""
        ...

    async def manifest(self, ref: ArtifactRef) -> tuple[bytes, bytes]: ...

    def stream_file(
        self, ref: ArtifactRef, path: str, offset: int, chunk_bytes: int
    ) -> AsyncIterator[bytes]:
        """The file's bytes from ``offset`` to its end, in chunks."""
        ...


@dataclass(frozen=True)
class Fetched:
    directory: Path
    manifest: ArtifactManifest
    key_id: str
    downloaded_bytes: int  # fetched in this attempt (resumed bytes not counted)
    resumed_bytes: int  # already on disk from an earlier attempt
    download_s: float
    verify_s: float


async def fetch_verified(
    source: ArtifactSource,
    ref: ArtifactRef,
    staging_root: Path,
    trusted: Mapping[str, Ed25519PublicKey],
    chunk_bytes: int = CHUNK_BYTES,
) -> Fetched:
    """Download ``ref`` into ``staging_root/<kind>/<name>/<version>`` and verify it.

    Raises SignatureError (unsigned, untrusted or tampered manifest) or ArtifactError
    (a file that does not match the signed manifest, or a registry that serves short).
    """
    started = time.perf_counter()
    payload, signature = await source.manifest(ref)
    key_id = verify(trusted, payload, signature)
    manifest = parse_manifest(payload)
    if manifest.ref != ref:
        raise ArtifactError(f"asked for {ref}, the signed manifest is for {manifest.ref}")
    directory = staging_root / ref.kind / ref.name / str(ref.version)
    directory.mkdir(parents=True, exist_ok=True)
    downloaded = resumed = 0
    for entry in manifest.files:
        final = directory / entry.path
        if final.exists() and final.stat().st_size == entry.size_bytes:
            continue  # complete from an earlier attempt; verified below with the rest
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + PART_SUFFIX)
        offset = part.stat().st_size if part.exists() else 0
        if offset > entry.size_bytes:
            part.unlink()
            offset = 0
        resumed += offset
        with part.open("ab") as stream:
            if offset < entry.size_bytes:
                async for chunk in source.stream_file(ref, entry.path, offset, chunk_bytes):
                    if offset + len(chunk) > entry.size_bytes:
                        raise ArtifactError(f"{entry.path}: registry sent more than listed")
                    stream.write(chunk)
                    offset += len(chunk)
                    downloaded += len(chunk)
        if offset != entry.size_bytes:
            raise ArtifactError(f"{entry.path}: registry stopped at {offset} bytes")
        if await asyncio.to_thread(sha256_of, part) != entry.sha256:
            part.unlink()
            raise ArtifactError(f"{ref}: {entry.path}: sha256 differs from the signed manifest")
        part.rename(final)
    download_s = time.perf_counter() - started
    started = time.perf_counter()
    await asyncio.to_thread(verify_files, directory, manifest)
    (directory / ARTIFACT_MANIFEST).write_bytes(payload)
    (directory / ARTIFACT_SIGNATURE).write_bytes(signature)
    return Fetched(
        directory,
        manifest,
        key_id,
        downloaded,
        resumed,
        download_s,
        time.perf_counter() - started,
    )
