"""Promotion statements: which version of an artifact sites should run, signed by the
operator, numbered so a site can tell a new statement from a replayed old one.

A statement (canonical JSON, schema ``hybridmesh.promotion/v1``) names the artifact
(kind, name), the version, the action (``promote`` or ``rollback``) and a sequence number
that rises by one with every statement for that artifact. It travels with a detached
signature document (``ota.signatures``) by the operator's key, beside the promoted version
in ``ListArtifacts``. The registry only stores and serves statements: it cannot make one.

The rules a site applies (``PromotionGuard``), after TUF's timestamp role
(theupdateframework/python-tuf ``TrustedMetadataSet.update_timestamp``):

- the signature is by a key the site trusts, and the statement is for the artifact asked
  about (kind and name), before anything else is looked at;
- a sequence lower than the highest the site accepted is a replay (rollback attack):
  refused; the same sequence is accepted only for the same version (one sequence, one
  statement);
- a ``promote`` statement may not move the site below the version it serves: going back
  needs a ``rollback`` statement, which the operator signs on purpose;
- the highest accepted sequence is persisted (``<staging>/promotions.json``, next to
  ``refused.json``) only after every check passed, so a restart does not forget it and a
  refused statement leaves no trace in it (the tough CVE-2025-2888 lesson).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ota.artifacts import ArtifactError, ArtifactRef, check_identity
from ota.signatures import SignatureError, verify

PROMOTION_SCHEMA = "hybridmesh.promotion/v1"
ACTIONS = ("promote", "rollback")
PROMOTIONS_FILE = "promotions.json"


class PromotionError(Exception):
    """A statement is malformed, unsigned, not for this artifact, stale or a downgrade."""


@dataclass(frozen=True)
class Promotion:
    kind: str
    name: str
    version: int
    sequence: int  # >= 1, +1 per statement of this artifact
    action: str  # "promote" | "rollback"
    issued: str  # ISO 8601, informative

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.kind, self.name, self.version)

    def to_bytes(self) -> bytes:
        """Canonical bytes: the exact payload that is signed and verified."""
        document = {
            "schema": PROMOTION_SCHEMA,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "sequence": self.sequence,
            "action": self.action,
            "issued": self.issued,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignedPromotion:
    """A statement's exact bytes and its detached signature document."""

    statement: bytes
    signature: bytes

    @property
    def promotion(self) -> Promotion:
        """The parsed statement (not verified: see ``verify_promotion``)."""
        return parse_promotion(self.statement)


def _positive_int(document: Mapping[str, Any], key: str) -> int:
    value = document[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PromotionError(f"{key} must be a positive integer, not {value!r}")
    return value


def parse_promotion(data: bytes) -> Promotion:
    """Parse and check a statement received from anywhere (it is not trusted yet)."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("schema") != PROMOTION_SCHEMA:
            raise PromotionError(f"statement schema must be {PROMOTION_SCHEMA}")
        promotion = Promotion(
            kind=str(document["kind"]),
            name=str(document["name"]),
            version=_positive_int(document, "version"),
            sequence=_positive_int(document, "sequence"),
            action=str(document["action"]),
            issued=str(document.get("issued", "")),
        )
        check_identity(promotion.kind, promotion.name, promotion.version)
    except (ValueError, KeyError, TypeError, ArtifactError) as error:
        raise PromotionError(f"malformed promotion statement: {error}") from None
    if promotion.action not in ACTIONS:
        raise PromotionError(f"action must be one of {list(ACTIONS)}")
    return promotion


def verify_promotion(
    trusted: Mapping[str, Ed25519PublicKey], signed: SignedPromotion, kind: str, name: str
) -> Promotion:
    """The statement, when a trusted key signed it and it is about ``kind`` ``name``."""
    try:
        verify(trusted, signed.statement, signed.signature)
    except SignatureError as error:
        raise PromotionError(f"promotion statement: {error}") from None
    promotion = signed.promotion
    if (promotion.kind, promotion.name) != (kind, name):
        raise PromotionError(
            f"the signed statement is for {promotion.kind} {promotion.name}, not {kind} {name}"
        )
    return promotion


@dataclass(frozen=True)
class Accepted:
    sequence: int
    version: int


class PromotionGuard:
    """The highest statement a site accepted per artifact name, written through to
    ``<directory>/promotions.json`` (``{"<name>": {"sequence": n, "version": v}}``)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / PROMOTIONS_FILE
        self._accepted: dict[str, Accepted] = {}
        if self.path.exists():
            loaded = json.loads(self.path.read_text())
            self._accepted = {
                name: Accepted(int(entry["sequence"]), int(entry["version"]))
                for name, entry in loaded.items()
            }

    def accepted(self, name: str) -> Accepted | None:
        return self._accepted.get(name)

    def check(self, promotion: Promotion, serving: int | None) -> None:
        """PromotionError when ``promotion`` (already verified) must not be acted on."""
        last = self._accepted.get(promotion.name)
        if last is not None:
            if promotion.sequence < last.sequence:
                raise PromotionError(
                    f"stale statement: sequence {promotion.sequence} is below the "
                    f"{last.sequence} this site accepted (a replayed promotion)"
                )
            if promotion.sequence == last.sequence and promotion.version != last.version:
                raise PromotionError(
                    f"sequence {promotion.sequence} was accepted for v{last.version}, "
                    f"this statement says v{promotion.version}"
                )
        if promotion.action == "promote" and serving is not None and promotion.version < serving:
            raise PromotionError(
                f"a promote statement may not move this site from v{serving} down to "
                f"v{promotion.version}: that needs an operator-signed rollback statement"
            )

    def accept(self, promotion: Promotion) -> None:
        """Remember ``promotion`` (call only after ``check`` passed)."""
        last = self._accepted.get(promotion.name)
        if last is not None and last.sequence >= promotion.sequence:
            return
        self._accepted[promotion.name] = Accepted(promotion.sequence, promotion.version)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        document = {
            name: {"sequence": a.sequence, "version": a.version}
            for name, a in sorted(self._accepted.items())
        }
        temporary.write_text(json.dumps(document) + "\n")
        os.replace(temporary, self.path)  # atomic: a crash leaves the old or the new state
