"""The cloud service's pure parts, without a socket: Triton failure mapping (on the
statuses and messages the real Triton produced, see test_cloud_inference), site tokens,
admission limits, labels."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cloud_inference.admission import Admission
from cloud_inference.auth import (
    SiteAuthenticator,
    SiteTokenConfigError,
    load_site_hashes,
    token_sha256,
)
from cloud_inference.labels import facts_from_repository, facts_from_store
from cloud_inference.triton_client import TritonModel, map_triton_failure
from services.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tests.helpers.paths import STORE
from tests.helpers.waiting import eventually
from workload.fashion_mnist import LABELS
from workload.model_store import load_verified

# (gRPC status, message) as the bundled Triton 2.51 and tritonclient report them.
TRITON_FAILURES = [
    (
        "StatusCode.UNAVAILABLE",
        "[request id: x] Exceeds maximum queue size",
        ResourceExhaustedError,
        None,
    ),
    ("StatusCode.UNAVAILABLE", "Request timeout expired", DeadlineExceededError, None),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceededError, None),
    (
        "StatusCode.NOT_FOUND",
        "Request for unknown model: 'nope' is not found",
        NotFoundError,
        "model.name",
    ),
    (
        "StatusCode.NOT_FOUND",
        "Request for unknown model: 'fashion-cloud' version 7 is not found",
        NotFoundError,
        "model.version",
    ),
    ("StatusCode.INVALID_ARGUMENT", "unexpected datatype FP32", InvalidArgumentError, "inputs"),
    ("StatusCode.RESOURCE_EXHAUSTED", "message larger than max", ResourceExhaustedError, None),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", UnavailableError, None),
    ("StatusCode.CANCELLED", "Cancelled", UnavailableError, None),
    ("", "Socket closed", UnavailableError, None),
    ("StatusCode.INTERNAL", "onnxruntime: Reshape failed", InternalError, None),
]


@pytest.mark.parametrize(("status", "message", "mapped", "field"), TRITON_FAILURES)
def test_triton_failures_map_to_what_callers_should_do(
    status: str, message: str, mapped: type[Exception], field: str | None
) -> None:
    error = map_triton_failure(status, message, "fashion-cloud", retry_after_ms=40)
    assert type(error) is mapped
    assert error.field == field
    assert message in error.message
    if isinstance(error, ResourceExhaustedError):
        assert error.trailing_metadata() == (("grpc-retry-pushback-ms", "40"),)


def test_a_site_is_known_by_its_tokens_hash_only() -> None:
    authenticator = SiteAuthenticator({"a": token_sha256("alpha"), "b": token_sha256("beta")})
    assert authenticator.site_for([("authorization", "Bearer alpha")]) == "a"
    assert authenticator.site_for([("x", "y"), ("authorization", "bearer beta ")]) == "b"
    for refused in (
        None,
        [],
        [("authorization", "Bearer gamma")],
        [("authorization", "alpha")],
        [("authorization", "Basic alpha")],
        [("authorization", b"Bearer alpha")],
        [("authorization-bin", "Bearer alpha")],
    ):
        assert authenticator.site_for(refused) is None, refused
    assert SiteAuthenticator({}).site_for([("authorization", "Bearer alpha")]) is None


def test_site_hashes_come_from_settings_and_a_file(tmp_path: Path) -> None:
    secrets = tmp_path / "site-tokens.json"
    secrets.write_text(json.dumps({"b": token_sha256("beta").upper(), "a": token_sha256("new")}))
    hashes = load_site_hashes({"a": token_sha256("old")}, secrets)
    assert hashes == {"a": token_sha256("new"), "b": token_sha256("beta")}  # the file wins
    # A raw token where its hash belongs refuses to start instead of refusing every call.
    with pytest.raises(SiteTokenConfigError, match=r"\['c'\]"):
        load_site_hashes({"c": "plain-token"}, None)
    secrets.write_text("[]")
    with pytest.raises(SiteTokenConfigError):
        load_site_hashes({}, secrets)


async def test_admission_bounds_in_flight_and_waiting() -> None:
    admission = Admission(max_in_flight=1, max_queued=1, retry_after_ms=25)
    release = asyncio.Event()

    held = asyncio.Event()

    async def hold() -> None:
        async with admission.slot(5.0):
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()
    waiter = asyncio.create_task(hold())
    await eventually(lambda: admission.queued == 1)
    assert admission.queued == 1
    with pytest.raises(ResourceExhaustedError) as refused:
        async with admission.slot(5.0):
            pass
    assert refused.value.retry_after_ms == 25
    release.set()
    await asyncio.gather(holder, waiter)
    assert admission.queued == 0


async def test_admission_never_waits_past_the_budget() -> None:
    admission = Admission(max_in_flight=1, max_queued=10, retry_after_ms=25)
    async with admission.slot(1.0):
        with pytest.raises(DeadlineExceededError):
            async with admission.slot(0.01):
                pass
        assert admission.queued == 0
    # The slot came back: the next caller gets it at once.
    async with admission.slot(0.0):
        pass


def test_labels_and_hash_of_the_served_version_from_the_store() -> None:
    facts = facts_from_store(STORE, [("fashion-cloud", "1"), ("fashion-cloud-x", "1")])
    assert facts["fashion-cloud"].labels == tuple(LABELS)
    assert (
        facts["fashion-cloud"].sha256 == load_verified(STORE / "fashion-cloud" / "1").model_sha256
    )
    assert "fashion-cloud-x" not in facts  # unknown to the store: answers carry indices


def test_labels_from_a_triton_repository_keep_line_order(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "labels.txt").write_text("zero\n\ntwo\n\n")
    facts = facts_from_repository(tmp_path, ["m", "absent"])
    assert facts["m"].labels == ("zero", "", "two") and facts["m"].sha256 == ""
    assert "absent" not in facts


def test_the_served_version_is_the_highest_number() -> None:
    model = TritonModel("m", ("9", "10", "2"), (), (), 8)
    assert model.served_version == "10"
    assert TritonModel("m", (), (), (), 8).served_version == ""
