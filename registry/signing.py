"""Ed25519 signatures of artifact manifests: the operator signs, edge sites verify.

The private key stays with the operator (PEM, PKCS#8, file mode 0600); edge sites are
configured with the public keys they trust. A signature names its key by id (the first
16 hex digits of the sha256 of the raw public key), so keys can be rotated: an edge trusts
a set of keys, not one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_KEY_FILE = "publisher.key"
PUBLIC_KEY_FILE = "publisher.pub"
SIGNATURE_SCHEMA = "hybridmesh.signature/v1"


class SignatureError(Exception):
    """A signature is missing, malformed, by an untrusted key, or does not match."""


@dataclass(frozen=True)
class PublisherKey:
    """The operator's signing key."""

    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public)


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(directory: Path) -> PublisherKey:
    """A new key pair in ``directory`` (publisher.key 0600, publisher.pub)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = PublisherKey(Ed25519PrivateKey.generate())
    private_path = directory / PRIVATE_KEY_FILE
    pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: never world-readable, not even for a moment.
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(pem)
    (directory / PUBLIC_KEY_FILE).write_bytes(
        key.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key


def load_private_key(path: Path) -> PublisherKey:
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return PublisherKey(loaded)


def load_trusted_keys(paths: Sequence[Path]) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key, from PEM files."""
    trusted = {}
    for path in paths:
        loaded = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(loaded, Ed25519PublicKey):
            raise SignatureError(f"{path}: not an Ed25519 public key")
        trusted[key_id_of(loaded)] = loaded
    return trusted


def sign(key: PublisherKey, payload: bytes) -> bytes:
    """A detached signature document (JSON) over ``payload``."""
    document = {
        "schema": SIGNATURE_SCHEMA,
        "key_id": key.key_id,
        "signature": base64.b64encode(key.private.sign(payload)).decode(),
    }
    return (json.dumps(document, sort_keys=True) + "\n").encode()


def verify(trusted: Mapping[str, Ed25519PublicKey], payload: bytes, signature: bytes) -> str:
    """The id of the trusted key that signed ``payload``; SignatureError otherwise."""
    try:
        document = json.loads(signature)
        key_id = document["key_id"]
        raw = base64.b64decode(document["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise SignatureError(f"malformed signature document: {error}") from None
    if not isinstance(document, dict) or document.get("schema") != SIGNATURE_SCHEMA:
        raise SignatureError("signature document of an unknown schema")
    public = trusted.get(key_id)
    if public is None:
        raise SignatureError(f"signed by key {key_id!r}, which this site does not trust")
    try:
        public.verify(raw, payload)
    except InvalidSignature:
        raise SignatureError(f"signature by key {key_id} does not match the manifest") from None
    return str(key_id)
