"""Promotions a site can verify (ota.promotions, ota.updates): a site moves only on an
operator-signed statement by a key it trusts, never back to an older one (a replay), and
down only on a signed rollback statement; it remembers the highest sequence it accepted
across restarts. The registry's store keeps statements only in sequence."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ota.artifacts import ArtifactRef
from ota.promotions import PROMOTIONS_FILE, SignedPromotion
from ota.signatures import load_trusted_keys
from ota.updates import SiteUpdates
from registry.signing import PublisherKey, generate_key, load_private_key, sign_promotion
from registry.store import RegistryStore, StatementError, StoreSource
from tests.helpers.ota_site import COMMITTED_STORE, make_version
from tests.helpers.paths import EDGE_MODEL


class ReplayingSource:
    """A registry that serves what the test says as the promotion (a compromised or
    stale registry), and the store's files otherwise."""

    def __init__(self, store: RegistryStore) -> None:
        self._source = StoreSource(store)
        self.statement: SignedPromotion | None = None

    async def promotion(self, kind: str, name: str) -> SignedPromotion | None:
        return self.statement

    async def manifest(self, ref: ArtifactRef) -> tuple[bytes, bytes]:
        return await self._source.manifest(ref)

    def stream_file(
        self, ref: ArtifactRef, path: str, offset: int, chunk_bytes: int
    ) -> AsyncIterator[bytes]:
        return self._source.stream_file(ref, path, offset, chunk_bytes)


@pytest.fixture
def store(tmp_path: Path) -> RegistryStore:
    key = generate_key(tmp_path / "operator")
    registry = RegistryStore(tmp_path / "registry")
    registry.publish(COMMITTED_STORE / EDGE_MODEL / "1", ArtifactRef("model", EDGE_MODEL, 1), key)
    for version in (2, 3):
        source = make_version(tmp_path / "publisher", version)
        registry.publish(source, ArtifactRef("model", EDGE_MODEL, version), key)
    return registry


def operator(tmp_path: Path) -> PublisherKey:
    return load_private_key(tmp_path / "operator" / "publisher.key")


def site(source: object, tmp_path: Path) -> SiteUpdates:
    trusted = load_trusted_keys([tmp_path / "operator" / "publisher.pub"])
    return SiteUpdates(source, "model", tmp_path / "site", trusted)  # type: ignore[arg-type]


def statement(
    key: PublisherKey, version: int, sequence: int, action: str = "promote"
) -> SignedPromotion:
    return sign_promotion(key, "model", EDGE_MODEL, version, sequence, action)


async def test_a_signed_promotion_is_taken_and_its_sequence_remembered(
    store: RegistryStore, tmp_path: Path
) -> None:
    key = operator(tmp_path)
    store.promote("model", EDGE_MODEL, 2, key)
    updates = site(StoreSource(store), tmp_path)
    assert await updates.wanted(EDGE_MODEL, "1") == 2
    assert await updates.wanted(EDGE_MODEL, "2") is None, "already serving"
    persisted = json.loads((tmp_path / "site" / PROMOTIONS_FILE).read_text())
    assert persisted == {EDGE_MODEL: {"sequence": 1, "version": 2}}


async def test_an_unsigned_or_foreign_promotion_is_refused(
    store: RegistryStore, tmp_path: Path
) -> None:
    source = ReplayingSource(store)
    updates = site(source, tmp_path)
    good = statement(operator(tmp_path), 2, 1)
    source.statement = SignedPromotion(good.statement, b"")
    assert await updates.wanted(EDGE_MODEL, "1") is None
    assert "malformed signature" in updates.statement_refusals[EDGE_MODEL]
    intruder = generate_key(tmp_path / "intruder")
    source.statement = statement(intruder, 2, 1)
    assert await updates.wanted(EDGE_MODEL, "1") is None
    assert "not among the trusted keys" in updates.statement_refusals[EDGE_MODEL]
    # Signed, but about another artifact: not a promotion of this one.
    source.statement = sign_promotion(operator(tmp_path), "model", "other", 2, 1, "promote")
    assert await updates.wanted(EDGE_MODEL, "1") is None
    assert "not model fashion-edge" in updates.statement_refusals[EDGE_MODEL]
    # Tampered: the version changed after signing.
    source.statement = SignedPromotion(
        good.statement.replace(b'"version":2', b'"version":3'), good.signature
    )
    assert await updates.wanted(EDGE_MODEL, "1") is None
    assert "does not match" in updates.statement_refusals[EDGE_MODEL]
    assert not (tmp_path / "site" / PROMOTIONS_FILE).exists(), "nothing refused is remembered"


async def test_a_stale_promotion_is_refused_even_after_a_restart(
    store: RegistryStore, tmp_path: Path
) -> None:
    key = operator(tmp_path)
    source = ReplayingSource(store)
    updates = site(source, tmp_path)
    first, second = statement(key, 2, 1), statement(key, 3, 2)
    source.statement = second
    assert await updates.wanted(EDGE_MODEL, "2") == 3
    # The registry (or anyone in the path) replays the older, validly signed statement.
    source.statement = first
    assert await updates.wanted(EDGE_MODEL, "3") is None
    assert "stale statement" in updates.statement_refusals[EDGE_MODEL]
    restarted = site(source, tmp_path)
    assert await restarted.wanted(EDGE_MODEL, "3") is None
    assert "stale statement" in restarted.statement_refusals[EDGE_MODEL]
    # One sequence, one statement: the same number for another version is refused.
    source.statement = statement(key, 1, 2)
    assert await restarted.wanted(EDGE_MODEL, "3") is None
    assert "was accepted for v3" in restarted.statement_refusals[EDGE_MODEL]


async def test_going_back_needs_a_signed_rollback_statement(
    store: RegistryStore, tmp_path: Path
) -> None:
    key = operator(tmp_path)
    source = ReplayingSource(store)
    updates = site(source, tmp_path)
    source.statement = statement(key, 1, 5)  # a fresh "promote v1" while v3 serves
    assert await updates.wanted(EDGE_MODEL, "3") is None
    assert "rollback statement" in updates.statement_refusals[EDGE_MODEL]
    source.statement = statement(key, 1, 6, "rollback")
    assert await updates.wanted(EDGE_MODEL, "3") == 1
    assert updates.statement_refusals[EDGE_MODEL] == ""


def test_the_store_keeps_statements_in_sequence_only(store: RegistryStore, tmp_path: Path) -> None:
    key = operator(tmp_path)
    store.promote("model", EDGE_MODEL, 1, key)
    store.promote("model", EDGE_MODEL, 2, key)
    with pytest.raises(StatementError, match="not the next"):
        store.record(statement(key, 3, 2))  # a replayed sequence
    with pytest.raises(StatementError, match="not the next"):
        store.record(statement(key, 3, 9))  # a skipped one
    with pytest.raises(StatementError, match="goes back to v1"):
        store.record(statement(key, 3, 3, "rollback"))
    assert store.rollback("model", EDGE_MODEL, key) == 1
    signed = store.promotion("model", EDGE_MODEL)
    assert signed is not None
    assert (signed.promotion.action, signed.promotion.sequence, signed.promotion.version) == (
        "rollback",
        3,
        1,
    )
    assert store.promoted("model", EDGE_MODEL) == 1
