"""Repeated INTERNAL from a model makes the cloud service NOT_SERVING for it until a probe
succeeds: the pure rule (cloud_inference/model_health.py) and the real thing, a real
Triton whose model fails on purpose or whose python stub is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_inference.app import CLOUD_SERVICE_NAME
from cloud_inference.model_health import ModelHealth, ModelHealthConfig
from localmesh.triton import TritonServer
from services.logging import get_logger
from tests.helpers.cloud_service import (
    AUTH,
    NOT_SERVING,
    SERVING,
    RunningCloud,
    cloud_settings,
    start_cloud,
    triton_requests,
    write_toy_model,
)
from tests.helpers.processes import process_group
from tests.helpers.requests import cloud_request
from tests.helpers.waiting import eventually

_log = get_logger("tests.cloud_model_health")
FLAKY = "flaky"  # fails (raises in execute) while its flag file exists
VICTIM = "victim"  # a healthy toy whose python stub the test kills


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the pure rule -------------------------------------------------------------------


def test_threshold_of_consecutive_internal_makes_a_model_unhealthy() -> None:
    health = ModelHealth(["a", "b"], ModelHealthConfig(internal_threshold=3))
    assert not health.record("a", internal=True)
    assert not health.record("a", internal=True)
    assert health.healthy("a")
    assert health.record("a", internal=True)  # the third in a row
    assert not health.healthy("a") and health.healthy("b")
    assert not health.all_healthy and health.unhealthy() == ["a"]
    assert not health.record("a", internal=True)  # already unhealthy: no new transition


def test_any_other_answer_ends_the_streak() -> None:
    health = ModelHealth(["a"], ModelHealthConfig(internal_threshold=2))
    health.record("a", internal=True)
    health.record("a", internal=False)
    assert not health.record("a", internal=True)
    assert health.healthy("a")
    assert health.record("a", internal=True)


def test_only_a_probe_makes_an_unhealthy_model_healthy() -> None:
    health = ModelHealth(["a"], ModelHealthConfig(internal_threshold=1))
    health.record("a", internal=True)
    # A live call admitted before the failure may still succeed: it proves nothing.
    health.record("a", internal=False)
    assert not health.healthy("a")
    assert health.due_probes() == ["a"]
    assert not health.probe_result("a", ok=False)
    assert not health.healthy("a")
    assert health.probe_result("a", ok=True)
    assert health.healthy("a") and health.due_probes() == []
    # A fresh streak is needed to fail it again.
    assert health.record("a", internal=True)


def test_probes_are_rate_limited_per_model() -> None:
    clock = FakeClock()
    health = ModelHealth(["a", "b"], ModelHealthConfig(1, probe_interval_s=2.0), clock)
    health.record("a", internal=True)
    assert health.due_probes() == ["a"]  # the first at once
    clock.now += 1.9
    health.record("b", internal=True)
    assert health.due_probes() == ["b"]  # "a" not yet
    clock.now += 0.1
    assert health.due_probes() == ["a"]
    assert health.due_probes() == []


def test_unknown_models_and_bad_config() -> None:
    health = ModelHealth(["a"])
    assert not health.record("nope", internal=True)
    assert health.healthy("nope") and health.all_healthy
    assert not health.probe_result("nope", ok=True)
    with pytest.raises(ValueError):
        ModelHealthConfig(internal_threshold=0)
    with pytest.raises(ValueError):
        ModelHealthConfig(probe_interval_s=0)


# -- against a real Triton -----------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sick_triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TritonServer]:
    base = tmp_path_factory.mktemp("sick-triton")
    flag = base / "fail"
    write_toy_model(base / "repository", FLAKY, fail_while_exists=flag)
    write_toy_model(base / "repository", VICTIM)
    async with TritonServer(base / "repository", base / "run") as server:
        yield server


def flag_of(triton: TritonServer) -> Path:
    return triton.model_repository.parent / "fail"


async def health_of(cloud: RunningCloud, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(cloud.channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2
    )
    return int(reply.status)


async def code_of(cloud: RunningCloud, model: str) -> grpc.StatusCode:
    try:
        await cloud.stub.Infer(cloud_request(model=model), metadata=AUTH, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.asyncio(loop_scope="module")
async def test_repeated_internal_is_not_serving_until_a_probe_succeeds(
    sick_triton: TritonServer,
) -> None:
    flag = flag_of(sick_triton)
    cloud = await start_cloud(
        cloud_settings(
            sick_triton.grpc_url, model_internal_threshold=3, model_probe_interval_s=0.3
        ),
        [FLAKY, VICTIM],
    )
    try:
        assert await code_of(cloud, FLAKY) == grpc.StatusCode.OK
        flag.touch()
        # Two INTERNAL answers are not yet a pattern.
        for _ in range(2):
            assert await code_of(cloud, FLAKY) == grpc.StatusCode.INTERNAL
        assert await health_of(cloud, "") == SERVING
        assert await code_of(cloud, FLAKY) == grpc.StatusCode.INTERNAL
        await eventually(lambda: cloud.health_is(NOT_SERVING), timeout_s=5)
        assert await health_of(cloud, f"{CLOUD_SERVICE_NAME}/{FLAKY}") == NOT_SERVING
        assert await health_of(cloud, CLOUD_SERVICE_NAME) == NOT_SERVING
        assert await health_of(cloud, f"{CLOUD_SERVICE_NAME}/{VICTIM}") == SERVING

        # Probes run while it stays sick, at the configured rate at most.
        probes_at_start = await triton_requests(sick_triton, FLAKY)
        started = time.monotonic()
        await eventually(lambda: more_than(sick_triton, FLAKY, probes_at_start + 2), timeout_s=10)
        probes = await triton_requests(sick_triton, FLAKY) - probes_at_start
        assert probes <= (time.monotonic() - started) / 0.3 + 2
        assert await health_of(cloud, "") == NOT_SERVING

        flag.unlink()
        await eventually(lambda: cloud.health_is(SERVING), timeout_s=5)
        assert await health_of(cloud, f"{CLOUD_SERVICE_NAME}/{FLAKY}") == SERVING
        assert await code_of(cloud, FLAKY) == grpc.StatusCode.OK
    finally:
        flag.unlink(missing_ok=True)
        await cloud.stop()


async def more_than(triton: TritonServer, model: str, count: int) -> bool:
    return await triton_requests(triton, model) > count


def stub_pid(triton: TritonServer, model: str) -> int:
    assert triton.pid is not None
    for pid in process_group(triton.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"/{model}/1/model.py".encode() in command:
            return pid
    raise AssertionError(f"no python stub for {model} in Triton's process group")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_dead_python_stub_takes_the_model_out_of_service(
    sick_triton: TritonServer,
) -> None:
    """Triton still says the model is READY; the service must not say SERVING."""
    cloud = await start_cloud(
        cloud_settings(sick_triton.grpc_url, model_internal_threshold=3), [FLAKY, VICTIM]
    )
    try:
        assert await code_of(cloud, VICTIM) == grpc.StatusCode.OK
        os.kill(stub_pid(sick_triton, VICTIM), signal.SIGKILL)
        killed = time.monotonic()
        # Callers keep calling; three INTERNAL answers later the model is out.
        codes = await asyncio.gather(*(code_of(cloud, VICTIM) for _ in range(3)))
        assert set(codes) == {grpc.StatusCode.INTERNAL}
        await eventually(lambda: cloud.health_is(NOT_SERVING), timeout_s=5)
        detected_s = time.monotonic() - killed
        _log.info("dead stub -> NOT_SERVING", seconds=round(detected_s, 2), callers=3)
        assert await health_of(cloud, f"{CLOUD_SERVICE_NAME}/{VICTIM}") == NOT_SERVING
        assert await cloud.node.triton.is_ready([VICTIM])  # Triton itself: still READY
        # Probes keep failing: Triton does not restart the stub, so it stays out.
        failed = await triton_requests(sick_triton, VICTIM)
        await eventually(lambda: more_than(sick_triton, VICTIM, failed), timeout_s=10)
        assert await health_of(cloud, "") == NOT_SERVING
    finally:
        await cloud.stop()
