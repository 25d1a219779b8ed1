"""registry: signed manifests, immutable versions, promotion history, chunked reads.

Real files, real Ed25519 keys, the committed edge model as the artifact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from ota.artifacts import (
    ARTIFACT_MANIFEST,
    ARTIFACT_SIGNATURE,
    ArtifactError,
    ArtifactRef,
    parse_manifest,
    verify_files,
)
from ota.signatures import SignatureError, load_trusted_keys, verify
from registry.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    generate_key,
    load_private_key,
)
from registry.store import NotFoundError, RegistryError, RegistryStore
from services.errors import ECHO_MAX_CHARS, ELLIPSIS

REPO = Path(__file__).resolve().parent.parent
EDGE_MODEL = REPO / "models" / "store" / "fashion-edge" / "1"
EDGE_V1 = ArtifactRef("model", "fashion-edge", 1)


@pytest.fixture
def published(tmp_path: Path) -> tuple[RegistryStore, Path]:
    key = generate_key(tmp_path / "keys")
    store = RegistryStore(tmp_path / "registry")
    store.publish(EDGE_MODEL, EDGE_V1, key)
    return store, tmp_path / "keys"


def test_the_private_key_is_owner_only_and_round_trips(tmp_path: Path) -> None:
    key = generate_key(tmp_path)
    assert (tmp_path / PRIVATE_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert load_private_key(tmp_path / PRIVATE_KEY_FILE).key_id == key.key_id
    assert set(load_trusted_keys([tmp_path / PUBLIC_KEY_FILE])) == {key.key_id}


def test_a_published_version_verifies_with_the_trusted_key(
    published: tuple[RegistryStore, Path],
) -> None:
    store, keys = published
    payload, signature = store.manifest(EDGE_V1)
    trusted = load_trusted_keys([keys / PUBLIC_KEY_FILE])
    assert verify(trusted, payload, signature) == next(iter(trusted))
    manifest = parse_manifest(payload)
    assert {f.path for f in manifest.files} == {"MODEL_CARD.md", "manifest.json", "model.onnx"}
    verify_files(store.root / "model" / "fashion-edge" / "1", manifest)


def test_a_tampered_manifest_or_an_untrusted_key_is_refused(
    published: tuple[RegistryStore, Path], tmp_path: Path
) -> None:
    store, keys = published
    payload, signature = store.manifest(EDGE_V1)
    trusted = load_trusted_keys([keys / PUBLIC_KEY_FILE])
    document = json.loads(payload)
    document["files"][0]["sha256"] = "0" * 64
    tampered = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SignatureError, match="does not match"):
        verify(trusted, tampered, signature)
    other = generate_key(tmp_path / "other")
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        verify({other.key_id: other.public}, payload, signature)
    with pytest.raises(SignatureError, match="malformed"):
        verify(trusted, payload, b"")


def test_a_tampered_file_fails_verification(published: tuple[RegistryStore, Path]) -> None:
    store, _ = published
    directory = store.root / "model" / "fashion-edge" / "1"
    manifest = parse_manifest(store.manifest(EDGE_V1)[0])
    model = directory / "model.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF  # same size, different content
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256 differs"):
        verify_files(directory, manifest)


def test_versions_are_immutable_and_the_manifest_sits_beside_the_signature(
    published: tuple[RegistryStore, Path],
) -> None:
    store, keys = published
    with pytest.raises(RegistryError, match="immutable"):
        store.publish(EDGE_MODEL, EDGE_V1, load_private_key(keys / PRIVATE_KEY_FILE))
    directory = store.root / "model" / "fashion-edge" / "1"
    assert (directory / ARTIFACT_MANIFEST).exists() and (directory / ARTIFACT_SIGNATURE).exists()
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")], "no staging"


def test_promotion_history_and_rollback(
    published: tuple[RegistryStore, Path], tmp_path: Path
) -> None:
    store, keys = published
    key = load_private_key(keys / PRIVATE_KEY_FILE)
    copy = tmp_path / "v2"
    shutil.copytree(EDGE_MODEL, copy)
    (copy / "MODEL_CARD.md").write_text("version 2\n")
    store.publish(copy, ArtifactRef("model", "fashion-edge", 2), key)
    assert store.promoted("model", "fashion-edge") is None
    with pytest.raises(NotFoundError):
        store.promote("model", "fashion-edge", 3, key)
    store.promote("model", "fashion-edge", 1, key)
    store.promote("model", "fashion-edge", 2, key)
    assert store.promoted("model", "fashion-edge") == 2
    assert store.rollback("model", "fashion-edge", key) == 1
    assert store.promoted("model", "fashion-edge") == 1
    with pytest.raises(RegistryError, match="no earlier"):
        store.rollback("model", "fashion-edge", key)
    (summary,) = store.summaries()
    assert (summary.name, summary.versions, summary.promoted) == ("fashion-edge", (1, 2), 1)


def test_chunks_reassemble_the_file_and_resume_from_any_offset(
    published: tuple[RegistryStore, Path],
) -> None:
    store, _ = published
    manifest = parse_manifest(store.manifest(EDGE_V1)[0])
    entry = manifest.file("model.onnx")
    received = b""
    while len(received) < entry.size_bytes:
        received += store.read_chunk(EDGE_V1, "model.onnx", len(received), 4096)
    assert hashlib.sha256(received).hexdigest() == entry.sha256
    assert store.read_chunk(EDGE_V1, "model.onnx", entry.size_bytes, 4096) == b""
    with pytest.raises(RegistryError, match="outside"):
        store.read_chunk(EDGE_V1, "model.onnx", entry.size_bytes + 1, 10)


def test_only_listed_files_can_be_read(published: tuple[RegistryStore, Path]) -> None:
    store, _ = published
    for path in ("../channel.json", "artifact.sig", os.path.join("..", "..", "etc")):
        with pytest.raises(ArtifactError, match="has no file"):
            store.read_chunk(EDGE_V1, path, 0, 10)


def test_a_missing_paths_echo_is_clipped(published: tuple[RegistryStore, Path]) -> None:
    """The caller's path comes back cut to ECHO_MAX_CHARS, like every echoed string."""
    store, _ = published
    with pytest.raises(ArtifactError, match="has no file") as refused:
        store.read_chunk(EDGE_V1, "x" * 10_000, 0, 10)
    message = str(refused.value)
    assert "x" * ECHO_MAX_CHARS + ELLIPSIS in message
    assert "x" * (ECHO_MAX_CHARS + 1) not in message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": "other"}, "schema"),
        ({"kind": "firmware"}, "kind"),
        ({"name": "../x"}, "name"),
        ({"version": 0}, "version"),
        ({"files": [{"path": "../x", "sha256": "0" * 64, "size_bytes": 1}]}, "relative"),
        ({"files": [{"path": "a", "sha256": "xyz", "size_bytes": 1}]}, "sha256"),
        ({"files": []}, "no files"),
    ],
)
def test_malformed_manifests_are_refused_with_the_reason(
    published: tuple[RegistryStore, Path], change: dict[str, object], message: str
) -> None:
    store, _ = published
    document = json.loads(store.manifest(EDGE_V1)[0]) | change
    with pytest.raises(ArtifactError, match=message):
        parse_manifest(json.dumps(document).encode())
