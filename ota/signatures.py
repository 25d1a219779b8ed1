"""Ed25519 signature check of artifact manifests: what every site runs before it fetches.

Sites are configured with the public keys they trust. A signature document names its key
by id (the first 16 hex digits of the sha256 of the raw public key), so keys can be
rotated: a site trusts a set of keys, not one. Signing is the operator's side
(``registry.signing``); both sides share the document format defined here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNATURE_SCHEMA = "hybridmesh.signature/v1"


class SignatureError(Exception):
    """A signature is missing, malformed, by an untrusted key, or does not match."""


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_trusted_keys(paths: Sequence[Path]) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key, from PEM files."""
    trusted = {}
    for path in paths:
        loaded = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(loaded, Ed25519PublicKey):
            raise SignatureError(f"{path}: not an Ed25519 public key")
        trusted[key_id_of(loaded)] = loaded
    return trusted


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
        raise SignatureError(f"signed by key {key_id!r}, which is not among the trusted keys")
    try:
        public.verify(raw, payload)
    except InvalidSignature:
        raise SignatureError(
            f"signature by key {key_id} does not match the signed document (tampered or truncated)"
        ) from None
    return str(key_id)
