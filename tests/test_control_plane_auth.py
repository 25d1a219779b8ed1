"""Who may call the control plane, against real servers: a registry on port 0 (tokens;
mTLS and the ingress's forwarded client certificate) and an edge node process (its admin
service). Without a credential nothing but health answers (UNAUTHENTICATED), a site
cannot promote, roll back, list the fleet, report for another site or touch an edge
node's admin service (PERMISSION_DENIED), and every refusal is logged without the token.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from bench.load import ServerProcess
from hybridmesh.edge.v1 import edge_admin_pb2 as admin_pb
from hybridmesh.edge.v1 import edge_admin_pb2_grpc
from hybridmesh.registry.v1 import registry_service_pb2 as pb
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from localmesh.certs import MeshCertificates, ensure_certificates
from localmesh.envoy import ENVOY_BINARY, WanControl
from localmesh.launcher import free_port
from ota.artifacts import ArtifactRef
from ota.registry_client import to_wire
from registry.app import RegistryNode
from registry.config import RegistrySettings
from registry.signing import generate_key, sign_promotion
from services.access_rules import CONTROL_PLANE_SERVICES, OPERATOR, Role, methods_for, site_identity
from services.telemetry import create_telemetry
from tests.helpers.credentials import Credentials, bearer, make_credentials
from tests.helpers.ota_site import COMMITTED_STORE, golden_set
from tests.helpers.paths import EDGE_MODEL
from tests.helpers.waiting import eventually

MODEL = pb.ArtifactRef(kind=pb.ARTIFACT_KIND_MODEL, name=EDGE_MODEL, version=1)
SITE_A, SITE_B = site_identity("site-a"), site_identity("site-b")


@dataclass
class Registry:
    node: RegistryNode
    credentials: Credentials
    root: Path

    def signed(self, version: int, action: str = "promote") -> pb.SignedPromotion:
        """The operator's next statement for the edge model."""
        key = self.key
        sequence = self.node.store.channel("model", EDGE_MODEL).sequence + 1
        s = sign_promotion(key, "model", EDGE_MODEL, version, sequence, action)
        return pb.SignedPromotion(statement=s.statement, signature=s.signature)

    key: Any = None


async def _start(tmp_path: Path, **settings: Any) -> Registry:
    credentials = make_credentials(tmp_path / "credentials", ("site-a", "site-b"))
    node = RegistryNode(
        RegistrySettings(
            port=0,
            root=tmp_path / "registry",
            shutdown_grace_seconds=0,
            token_sha256=credentials.hashes(),
            **settings,
        ),
        create_telemetry("registry-auth-test", export_otlp=False),
    )
    key = generate_key(tmp_path / "operator")
    for version in (1, 2):
        node.store.publish(
            COMMITTED_STORE / EDGE_MODEL / "1", ArtifactRef("model", EDGE_MODEL, version), key
        )
    node.store.promote("model", EDGE_MODEL, 1, key)
    node.store.promote("model", EDGE_MODEL, 2, key)
    await node.start()
    registry = Registry(node, credentials, tmp_path)
    registry.key = key
    return registry


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    running = await _start(tmp_path)
    yield running
    await running.node.stop(0)


async def _code(call: Awaitable[Any] | Any) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _calls(
    stub: registry_service_pb2_grpc.RegistryServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...],
    registry: Registry,
) -> dict[str, Any]:
    """One call of every RegistryService RPC (fresh objects each time)."""
    status = pb.SiteStatus(site="site-a", served=[pb.ServedVersion(artifact=MODEL)])
    return {
        "ListArtifacts": stub.ListArtifacts(
            pb.ListArtifactsRequest(), timeout=5, metadata=metadata
        ),
        "GetManifest": stub.GetManifest(
            pb.GetManifestRequest(artifact=MODEL), timeout=5, metadata=metadata
        ),
        "FetchFile": stub.FetchFile(
            pb.FetchFileRequest(artifact=MODEL, path="model.onnx"), timeout=5, metadata=metadata
        ),
        "Promote": stub.Promote(
            pb.PromoteRequest(artifact=MODEL, promotion=registry.signed(1)),
            timeout=5,
            metadata=metadata,
        ),
        "Rollback": stub.Rollback(
            pb.RollbackRequest(artifact=MODEL, promotion=registry.signed(1, "rollback")),
            timeout=5,
            metadata=metadata,
        ),
        "ReportSiteStatus": stub.ReportSiteStatus(
            pb.ReportSiteStatusRequest(status=status), timeout=5, metadata=metadata
        ),
        "ListSites": stub.ListSites(pb.ListSitesRequest(), timeout=5, metadata=metadata),
    }


async def test_without_a_credential_nothing_but_health_answers(registry: Registry) -> None:
    with capture_logs() as logs:
        async with grpc.aio.insecure_channel(registry.node.host.address) as channel:
            stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
            for metadata in ((), bearer("not-a-token"), (("authorization", "Basic eA=="),)):
                for method, call in _calls(stub, metadata, registry).items():
                    assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED, method
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert registry.node.store.promoted("model", EDGE_MODEL) == 2, "nothing moved"
    assert registry.node.sites.reports() == []
    refused = [e for e in logs if e["event"] == "control-plane call refused"]
    assert len(refused) == 3 * 7, "each refusal logged"
    assert {(e["identity"], e["status"], e["log_level"]) for e in refused} == {
        ("none", "UNAUTHENTICATED", "warning")
    }
    assert f"/{CONTROL_PLANE_SERVICES[0]}/FetchFile" in {e["method"] for e in refused}
    assert "not-a-token" not in repr(logs)


async def _as_site(
    registry: Registry, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> tuple[dict[str, grpc.StatusCode], grpc.StatusCode, grpc.StatusCode]:
    stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
    codes = {m: await _code(c) for m, c in _calls(stub, metadata, registry).items()}
    # Another site's report, and a report with no site: the credential decides.
    other = pb.ReportSiteStatusRequest(status=pb.SiteStatus(site="site-b"))
    spoofed = await _code(stub.ReportSiteStatus(other, timeout=5, metadata=metadata))
    unnamed = pb.ReportSiteStatusRequest(status=pb.SiteStatus())
    await stub.ReportSiteStatus(unnamed, timeout=5, metadata=metadata)
    operator = bearer(registry.credentials.token(OPERATOR))
    as_operator = await _code(stub.ReportSiteStatus(other, timeout=5, metadata=operator))
    return codes, spoofed, as_operator


async def test_a_site_reads_and_reports_for_itself_only(registry: Registry) -> None:
    token = registry.credentials.token(SITE_A)
    metadata = bearer(token)
    with capture_logs() as logs:
        channel = grpc.aio.insecure_channel(registry.node.host.address)
        codes, spoofed, as_operator = await _as_site(registry, channel, metadata)
        await channel.close(None)
    assert codes == {
        "ListArtifacts": grpc.StatusCode.OK,
        "GetManifest": grpc.StatusCode.OK,
        "FetchFile": grpc.StatusCode.OK,
        "Promote": grpc.StatusCode.PERMISSION_DENIED,
        "Rollback": grpc.StatusCode.PERMISSION_DENIED,
        "ReportSiteStatus": grpc.StatusCode.OK,
        "ListSites": grpc.StatusCode.PERMISSION_DENIED,
    }
    assert spoofed == grpc.StatusCode.PERMISSION_DENIED
    assert as_operator == grpc.StatusCode.PERMISSION_DENIED, "the operator is not a site"
    assert [r.site for r in registry.node.sites.reports()] == ["site-a"]
    assert registry.node.store.promoted("model", EDGE_MODEL) == 2
    refused = {
        (e["identity"], e["method"].rsplit("/", 1)[1], e["status"])
        for e in logs
        if e["event"] == "control-plane call refused"
    }
    site_a = SITE_A.spiffe_id
    assert {
        (site_a, "Promote", "PERMISSION_DENIED"),
        (site_a, "Rollback", "PERMISSION_DENIED"),
        (site_a, "ListSites", "PERMISSION_DENIED"),
        (site_a, "ReportSiteStatus", "PERMISSION_DENIED"),  # the report for site-b
    } <= refused
    assert all(e.get("peer") for e in logs if e["event"] == "control-plane call refused"), (
        "every refusal names the peer it came from"
    )
    assert token not in repr(logs)


async def test_the_operator_promotes_only_with_a_signed_statement_in_sequence(
    registry: Registry,
) -> None:
    metadata = bearer(registry.credentials.token(OPERATOR))
    async with grpc.aio.insecure_channel(registry.node.host.address) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        unsigned = await _code(
            stub.Promote(pb.PromoteRequest(artifact=MODEL), timeout=5, metadata=metadata)
        )
        registry_stmt = registry.node.store.promotion("model", EDGE_MODEL)
        assert registry_stmt is not None
        replayed = pb.SignedPromotion(
            statement=registry_stmt.statement, signature=registry_stmt.signature
        )
        replay = await _code(
            stub.Promote(
                pb.PromoteRequest(
                    artifact=to_wire(ArtifactRef("model", EDGE_MODEL, 2)), promotion=replayed
                ),
                timeout=5,
                metadata=metadata,
            )
        )
        rolled = await stub.Rollback(
            pb.RollbackRequest(artifact=MODEL, promotion=registry.signed(1, "rollback")),
            timeout=5,
            metadata=metadata,
        )
        promoted = await stub.Promote(
            pb.PromoteRequest(
                artifact=to_wire(ArtifactRef("model", EDGE_MODEL, 2)),
                promotion=registry.signed(2),
            ),
            timeout=5,
            metadata=metadata,
        )
        sites = await _code(stub.ListSites(pb.ListSitesRequest(), timeout=5, metadata=metadata))
    assert unsigned == grpc.StatusCode.INVALID_ARGUMENT
    assert replay == grpc.StatusCode.FAILED_PRECONDITION
    assert rolled.promoted.version == 1 and promoted.promoted.version == 2
    assert sites == grpc.StatusCode.OK


# -- mTLS: the caller's certificate, or the ingress's forwarded one ----------------------


def _tls_dir(certificates: MeshCertificates, target: Path, cert: Path, key: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(certificates.ca, target / "ca.crt")
    shutil.copyfile(cert, target / "tls.crt")
    shutil.copyfile(key, target / "tls.key")
    return target


def _secure(
    certificates: MeshCertificates, address: str, cert: Path, key: Path
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        certificates.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    port = address.rsplit(":", 1)[1]
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def test_mtls_identities_and_the_forwarded_certificate_of_the_ingress_only(
    tmp_path: Path,
) -> None:
    certificates = ensure_certificates(tmp_path / "certs", site="site-a")
    tls = _tls_dir(
        certificates, tmp_path / "registry-tls", certificates.server_cert, certificates.server_key
    )
    probe_port = free_port()
    running = await _start(tmp_path, tls_dir=tls, probe_port=probe_port)
    address = running.node.host.address
    operator_xfcc = (
        (
            "x-forwarded-client-cert",
            "By=spiffe://hybridmesh/ingress;Hash=ab;URI=spiffe://hybridmesh/operator",
        ),
    )
    try:
        site = _secure(certificates, address, certificates.client_cert, certificates.client_key)
        ingress = _secure(certificates, address, certificates.server_cert, certificates.server_key)
        async with site, ingress, grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as probe:
            as_site = registry_service_pb2_grpc.RegistryServiceStub(site)
            via_ingress = registry_service_pb2_grpc.RegistryServiceStub(ingress)
            plain = registry_service_pb2_grpc.RegistryServiceStub(probe)
            listed = await _code(as_site.ListArtifacts(pb.ListArtifactsRequest(), timeout=5))
            # A site's own certificate with a forged header: still the site.
            forged = await _code(
                as_site.ListSites(pb.ListSitesRequest(), timeout=5, metadata=operator_xfcc)
            )
            forwarded = await _code(
                via_ingress.ListSites(pb.ListSitesRequest(), timeout=5, metadata=operator_xfcc)
            )
            ingress_alone = await _code(via_ingress.ListSites(pb.ListSitesRequest(), timeout=5))
            two = (
                (
                    "x-forwarded-client-cert",
                    "URI=spiffe://hybridmesh/site/site-a,URI=spiffe://hybridmesh/operator",
                ),
            )
            chained = await _code(
                via_ingress.ListSites(pb.ListSitesRequest(), timeout=5, metadata=two)
            )
            health = await health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            plaintext = await _code(
                plain.ListArtifacts(pb.ListArtifactsRequest(), timeout=5, metadata=operator_xfcc)
            )
    finally:
        await running.node.stop(0)
    assert listed == grpc.StatusCode.OK
    assert forged == grpc.StatusCode.PERMISSION_DENIED
    assert forwarded == grpc.StatusCode.OK
    assert ingress_alone == grpc.StatusCode.UNAUTHENTICATED, "the ingress itself is nobody"
    assert chained == grpc.StatusCode.UNAUTHENTICATED, "SANITIZE_SET sends one element"
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert plaintext == grpc.StatusCode.UNAUTHENTICATED, "the header counts over mTLS only"


# -- the edge node's admin service (a real edge node process) ----------------------------


async def test_only_the_operator_may_call_an_edge_nodes_admin_service(tmp_path: Path) -> None:
    credentials = make_credentials(tmp_path / "credentials", ("site-a",))
    store = tmp_path / "store"
    shutil.copytree(COMMITTED_STORE / EDGE_MODEL / "1", store / EDGE_MODEL / "1")
    golden_set().save(tmp_path / "golden.npz")
    generate_key(tmp_path / "operator")
    operator_key = tmp_path / "operator" / "publisher.pub"
    edge = ServerProcess(
        ["-m", "edge_node"],
        env={
            "HYBRIDMESH_EDGE_PORT": "{port}",
            "HYBRIDMESH_EDGE_MODEL_STORE": str(store),
            "HYBRIDMESH_EDGE_SERVED_MODELS": json.dumps([EDGE_MODEL]),
            # A registry nobody answers at: the admin service is what is under test.
            "HYBRIDMESH_EDGE_REGISTRY_TARGET": "127.0.0.1:9",
            "HYBRIDMESH_EDGE_TRUSTED_KEYS": json.dumps([str(operator_key)]),
            "HYBRIDMESH_EDGE_GOLDEN_SET": str(tmp_path / "golden.npz"),
            "HYBRIDMESH_EDGE_UPDATE_STAGING": str(tmp_path / "staging"),
            "HYBRIDMESH_EDGE_UPDATE_INTERVAL_S": "3600",
            # The site is known here too (as in the local mesh), and refused its calls.
            "HYBRIDMESH_EDGE_ADMIN_TOKEN_SHA256": json.dumps(credentials.hashes()),
            "HYBRIDMESH_EDGE_LOG_LEVEL": "warning",
        },
    )
    try:
        await edge.wait_serving()
        async with grpc.aio.insecure_channel(edge.address) as channel:
            stub = edge_admin_pb2_grpc.EdgeAdminServiceStub(channel)

            async def codes(metadata: tuple[tuple[str, str], ...]) -> list[grpc.StatusCode]:
                return [
                    await _code(
                        stub.GetUpdateStatus(
                            admin_pb.GetUpdateStatusRequest(), timeout=5, metadata=metadata
                        )
                    ),
                    await _code(
                        stub.CheckForUpdates(
                            admin_pb.CheckForUpdatesRequest(), timeout=5, metadata=metadata
                        )
                    ),
                    await _code(
                        stub.Rollback(
                            admin_pb.RollbackRequest(model=EDGE_MODEL), timeout=5, metadata=metadata
                        )
                    ),
                ]

            anonymous = await codes(())
            as_site = await codes(bearer(credentials.token(SITE_A)))
            status = await stub.GetUpdateStatus(
                admin_pb.GetUpdateStatusRequest(),
                timeout=5,
                metadata=bearer(credentials.token(OPERATOR)),
            )
    finally:
        edge.stop()
    assert anonymous == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert as_site == [grpc.StatusCode.PERMISSION_DENIED] * 3
    (model,) = status.models
    assert model.serving_version == "1" and list(model.refused_versions) == []


# -- the k8s cloud ingress (deploy/k8s/base/envoy/envoy-config.yaml), a real Envoy --------

ENVOY_CONFIG = Path(__file__).resolve().parent.parent / "deploy/k8s/base/envoy/envoy-config.yaml"


def _rbac_policies() -> dict[str, Any]:
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    filters = {f["name"]: f for f in manager["typed_config"]["http_filters"]}
    policies: dict[str, Any] = filters["envoy.filters.http.rbac"]["typed_config"]["rules"][
        "policies"
    ]
    return policies


def test_the_ingress_rbac_is_the_rule_table() -> None:
    """Envoy admits to the registry exactly what services.access_rules allows each role."""
    policies = _rbac_policies()
    registry = f"/{CONTROL_PLANE_SERVICES[0]}/"
    site_exact = {
        p["url_path"]["path"]["exact"]
        for p in policies["site"]["permissions"]
        if "exact" in p["url_path"]["path"]
    }
    site_paths = {path for path in site_exact if path.startswith(registry)}
    assert site_paths == {registry + m for m in methods_for(Role.SITE, CONTROL_PLANE_SERVICES[0])}
    # Beside the control plane, a site may only export its traces (the edge collector).
    assert site_exact - site_paths == {
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    }
    (operator,) = policies["operator"]["permissions"]
    assert operator["url_path"]["path"] == {"prefix": registry}
    (principal,) = policies["operator"]["principals"]
    assert principal["authenticated"]["principal_name"] == {"exact": OPERATOR.spiffe_id}


async def test_the_k8s_ingress_routes_the_registry_by_role(tmp_path: Path) -> None:
    """The committed Envoy config, run for real in front of a registry that trusts only
    its forwarded client certificate: a site's certificate reads and reports (as itself)
    but cannot promote or list the fleet; the operator's can."""
    certificates = ensure_certificates(tmp_path / "certs", site="site-a")
    tls = _tls_dir(
        certificates, tmp_path / "tls", certificates.server_cert, certificates.server_key
    )
    running = await _start(tmp_path, tls_dir=tls)
    registry_port = running.node.host.port
    listener, admin = free_port(), free_port()
    text = (
        ENVOY_CONFIG.read_text()
        .replace("/etc/envoy/tls/", f"{tls}/")
        .replace("port_value: 8443", f"port_value: {listener}")
        .replace("port_value: 9901", f"port_value: {admin}")
        .replace(
            "{address: registry, port_value: 50054}",
            f"{{address: 127.0.0.1, port_value: {registry_port}}}",
        )
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    envoy = await asyncio.create_subprocess_exec(
        str(ENVOY_BINARY), "-c", str(config), "--log-level", "warning",
        "--concurrency", "1", "--disable-hot-restart",
        "--log-path", str(tmp_path / "envoy.log"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        control = WanControl(admin)

        async def envoy_ready() -> bool:
            return await asyncio.to_thread(control.ready)

        await eventually(envoy_ready, 10, "envoy not ready; see envoy.log")
        address = f"localhost:{listener}"
        site = _secure(certificates, address, certificates.client_cert, certificates.client_key)
        operator = _secure(
            certificates, address, certificates.operator_cert, certificates.operator_key
        )
        async with site, operator:
            as_site = registry_service_pb2_grpc.RegistryServiceStub(site)
            as_operator = registry_service_pb2_grpc.RegistryServiceStub(operator)
            codes = {m: await _code(c) for m, c in _calls(as_site, (), running).items()}
            operator_sites = await as_operator.ListSites(pb.ListSitesRequest(), timeout=5)
            promoted = await as_operator.Promote(
                pb.PromoteRequest(artifact=MODEL, promotion=running.signed(1)), timeout=5
            )
    finally:
        envoy.terminate()
        await asyncio.wait_for(envoy.wait(), 10)
        await running.node.stop(0)
    assert codes == {
        "ListArtifacts": grpc.StatusCode.OK,
        "GetManifest": grpc.StatusCode.OK,
        "FetchFile": grpc.StatusCode.OK,
        "Promote": grpc.StatusCode.PERMISSION_DENIED,
        "Rollback": grpc.StatusCode.PERMISSION_DENIED,
        "ReportSiteStatus": grpc.StatusCode.OK,
        "ListSites": grpc.StatusCode.PERMISSION_DENIED,
    }
    assert [s.site for s in operator_sites.sites] == ["site-a"], "reported as its certificate"
    assert promoted.promoted.version == 1
