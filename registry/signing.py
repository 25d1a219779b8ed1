"""Ed25519 signing of artifact manifests: the operator's side.

The private key stays with the operator (PEM, PKCS#8, file mode 0600). Sites verify with
``ota.signatures`` and the public keys they trust; the signature document names its key
by id, so keys can be rotated.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ota.promotions import Promotion, SignedPromotion
from ota.signatures import SIGNATURE_SCHEMA, SignatureError, key_id_of

PRIVATE_KEY_FILE = "publisher.key"
PUBLIC_KEY_FILE = "publisher.pub"


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


def sign(key: PublisherKey, payload: bytes) -> bytes:
    """A detached signature document (JSON) over ``payload``."""
    document = {
        "schema": SIGNATURE_SCHEMA,
        "key_id": key.key_id,
        "signature": base64.b64encode(key.private.sign(payload)).decode(),
    }
    return (json.dumps(document, sort_keys=True) + "\n").encode()


def sign_promotion(  # noqa: PLR0917 (the statement's fields)
    key: PublisherKey, kind: str, name: str, version: int, sequence: int, action: str
) -> SignedPromotion:
    """An operator-signed promotion (or rollback) statement (``ota.promotions``)."""
    issued = datetime.now(UTC).replace(microsecond=0).isoformat()
    statement = Promotion(kind, name, version, sequence, action, issued).to_bytes()
    return SignedPromotion(statement, sign(key, statement))
