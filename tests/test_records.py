"""The record sink (services/records.py) behind the router's audit trail and the cloud's
intake log: written whatever the log level, one parseable line per record even from many
threads, and a failed write is raised, logged at error level and counted, never silent."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from cloud_inference.intake import INTAKE_STREAM, IntakeLog
from hybridmesh.cloud.v1 import cloud_service_pb2
from hybridmesh.common.v1 import model_pb2, routing_pb2
from hybridmesh.router.v1 import router_service_pb2_grpc
from router_service.app import RouterNode, pairs_from_catalog
from router_service.audit import AUDIT_STREAM, TransferAudit, content_sha256
from router_service.tier_api import TierUnavailableError
from services.errors import ECHO_MAX_CHARS
from services.logging import configure_logging
from services.records import WRITE_FAILURES_METRIC, RecordSink, RecordWriteError
from services.telemetry import create_telemetry
from services.tensors import encode_tensor
from tests.helpers.router_node import router_settings
from tests.helpers.scripted_tiers import HARD, ScriptedMesh, request, scripted_tiers
from tests.helpers.waiting import eventually

IMAGE = encode_tensor("image", np.zeros((2, 1, 28, 28), dtype=np.uint8))


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def failures(reader: InMemoryMetricReader) -> dict[str, int]:
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == WRITE_FAILURES_METRIC:
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        counts[str((point.attributes or {})["stream"])] = int(point.value)
    return counts


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """The service's own log at the CLI's level ("warning"): info lines are dropped."""
    stream = io.StringIO()
    configure_logging("warning", stream)
    yield stream
    configure_logging("info")


def test_audit_and_intake_records_are_written_at_warning_level(
    tmp_path: Path, service_log: io.StringIO
) -> None:
    audit_sink = RecordSink.open(tmp_path / "audit.jsonl", AUDIT_STREAM)
    intake_sink = RecordSink.open(tmp_path / "nested" / "intake.jsonl", INTAKE_STREAM)
    assert audit_sink.fsync and intake_sink.fsync  # regular files: fsync per record
    TransferAudit(audit_sink, "cloud:443").record(
        request_id="r-1",
        privacy_class=routing_pb2.PRIVACY_CLASS_INTERNAL,
        anonymiser="strip-attributes",
        tensors=[IMAGE],
        purpose="cloud-only",
        regions_blurred=0,
    )
    IntakeLog(intake_sink).record(
        cloud_service_pb2.InferRequest(
            request_id="r-1",
            model=model_pb2.ModelRef(name="fashion-cloud"),
            privacy_class=routing_pb2.PRIVACY_CLASS_INTERNAL,
            anonymiser="strip-attributes",
            reconciliation=True,
        )
    )
    audit_sink.close()
    intake_sink.close()
    (audit,) = lines(tmp_path / "audit.jsonl")
    (intake,) = lines(tmp_path / "nested" / "intake.jsonl")
    timestamp = audit.pop("timestamp")
    assert isinstance(timestamp, str) and timestamp.endswith("Z")
    assert audit == {
        "event": "off-site transfer",
        "stream": "audit",
        "request_id": "r-1",
        "privacy_class": "PRIVACY_CLASS_INTERNAL",
        "anonymiser": "strip-attributes",
        "regions_blurred": 0,
        "content_sha256": content_sha256([IMAGE]),
        "destination": "cloud:443",
        "purpose": "cloud-only",
        "items": 2,
    }
    intake.pop("timestamp")
    assert intake == {
        "event": "infer received",
        "stream": "intake",
        "request_id": "r-1",
        "privacy_class": "PRIVACY_CLASS_INTERNAL",
        "anonymiser": "strip-attributes",
        "reconciliation": True,
        "model": "fashion-cloud",
    }
    assert service_log.getvalue() == ""


def test_intake_cuts_unvalidated_caller_strings_short(tmp_path: Path) -> None:
    sink = RecordSink.open(tmp_path / "intake.jsonl", INTAKE_STREAM, fsync=False)
    IntakeLog(sink).record(
        cloud_service_pb2.InferRequest(
            request_id="x" * 10_000,
            model=model_pb2.ModelRef(name="m" * 10_000),
            privacy_class=42,  # type: ignore[arg-type]
        )
    )
    sink.close()
    (intake,) = lines(tmp_path / "intake.jsonl")
    assert len(str(intake["request_id"])) == ECHO_MAX_CHARS + 1  # with the ellipsis
    assert len(str(intake["model"])) == ECHO_MAX_CHARS + 1
    assert intake["privacy_class"] == "42"


def test_records_from_many_threads_stay_whole_lines(tmp_path: Path) -> None:
    sink = RecordSink.open(tmp_path / "audit.jsonl", AUDIT_STREAM, fsync=False)
    payload = "p" * 5000  # longer than a pipe's atomic write: lines must not interleave

    def writer(thread: int) -> None:
        for n in range(200):
            sink.write("record", request_id=f"{thread}-{n}", payload=payload)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sink.close()
    written = lines(tmp_path / "audit.jsonl")
    assert sorted(str(r["request_id"]) for r in written) == sorted(
        f"{t}-{n}" for t in range(8) for n in range(200)
    )


def test_a_failed_write_is_raised_logged_and_counted(service_log: io.StringIO) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    # /dev/full: every write fails with ENOSPC, as on a full volume.
    sink = RecordSink.open(Path("/dev/full"), AUDIT_STREAM, meter=meter)
    assert not sink.fsync  # a character device: nothing to sync
    audit = TransferAudit(sink, "cloud:443")
    with pytest.raises(TierUnavailableError) as raised:
        audit.record(
            request_id="lost-1",
            privacy_class=routing_pb2.PRIVACY_CLASS_PUBLIC,
            anonymiser="",
            tensors=[IMAGE],
            purpose="escalation",
        )
    # For the router: nothing was sent (no code), so it answers from the edge or queues.
    assert raised.value.code is None and not raised.value.sent
    assert "audit record could not be written" in raised.value.detail
    intake = IntakeLog(RecordSink.open(Path("/dev/full"), INTAKE_STREAM, meter=meter))
    with pytest.raises(RecordWriteError) as refused:
        intake.record(cloud_service_pb2.InferRequest(request_id="lost-2"))
    assert refused.value.code is grpc.StatusCode.UNAVAILABLE  # the cloud refuses the call
    logged = [json.loads(line) for line in service_log.getvalue().splitlines()]
    assert [(e["level"], e["request_id"], e["record_stream"]) for e in logged] == [
        ("error", "lost-1", "audit"),
        ("error", "lost-2", "intake"),
    ]
    assert "No space left on device" in logged[0]["error"]
    assert failures(reader) == {"audit": 1, "intake": 1}
    sink.close()
    with pytest.raises(RecordWriteError, match="closed"):
        sink.write("after close")
    assert failures(reader) == {"audit": 2, "intake": 1}


def test_a_torn_record_does_not_swallow_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, service_log: io.StringIO
) -> None:
    sink = RecordSink.open(tmp_path / "audit.jsonl", AUDIT_STREAM, fsync=False)
    sink.write("first", n=1)
    real_write = os.write

    def half_then_fail(fd: int, data: bytes | memoryview) -> int:
        monkeypatch.setattr(os, "write", real_write)
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(RecordWriteError):
        sink.write("torn", n=2)
    sink.write("third", n=3)
    sink.close()
    text = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert json.loads(text[0])["event"] == "first"
    assert json.loads(text[-1])["event"] == "third"
    assert len(text) == 3  # the torn half on a line of its own


def test_stdout_sink_writes_without_fsync(capfd: pytest.CaptureFixture[str]) -> None:
    sink = RecordSink.open(None, AUDIT_STREAM)
    sink.write("to stdout", request_id="s-1")
    sink.close()  # stdout is not ours to close
    (line,) = capfd.readouterr().out.splitlines()
    assert json.loads(line)["request_id"] == "s-1"


async def test_a_router_that_cannot_audit_sends_nothing_and_answers_from_the_edge(
    tmp_path: Path, service_log: io.StringIO
) -> None:
    """The audit log on a full volume: the escalation is not sent (no record, no
    transfer), the caller gets the edge answer, degraded, and the operator sees it."""
    reader = InMemoryMetricReader()
    async with scripted_tiers() as (edge, cloud):
        settings = router_settings(
            edge.address,
            cloud.address,
            audit_log_path=Path("/dev/full"),
            outbox_path=tmp_path / "outbox.sqlite",
        )
        router = RouterNode(
            settings,
            create_telemetry("router", metric_readers=[reader], export_otlp=False),
            pairs_from_catalog(settings.catalog),
        )
        await router.start()
        try:
            await eventually(lambda: router.tier_up["edge"] and router.tier_up["cloud"])
            async with grpc.aio.insecure_channel(router.host.address) as channel:
                mesh = ScriptedMesh(
                    edge,
                    cloud,
                    router,
                    router_service_pb2_grpc.RouterServiceStub(channel),
                    tmp_path / "unused",
                )
                reply = await mesh.stub.Infer(
                    request([HARD], mesh, request_id="unaudited"), timeout=2
                )
        finally:
            await router.stop(0)
    assert cloud.tier.calls == []  # nothing left the site
    assert reply.decision.served_by == routing_pb2.TIER_EDGE
    assert reply.decision.degraded and not reply.decision.data_left_site
    errors = [json.loads(line) for line in service_log.getvalue().splitlines()]
    errors = [e for e in errors if e["level"] == "error"]
    # The escalation's write failed; the item is owed to the cloud, so the outbox's
    # replay may try (and fail to audit) again: every failure is seen and counted.
    assert errors, "the failed audit write must be logged"
    assert {(e["event"], e["request_id"]) for e in errors} == {("record not written", "unaudited")}
    assert failures(reader) == {"audit": len(errors)}
    assert reply.decision.queued_for_reconciliation
