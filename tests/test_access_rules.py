"""The control plane's rule table (services.access_rules) is complete and means what the
threat model says: every RPC of every control-plane service has an entry."""

from __future__ import annotations

import pytest

from hybridmesh.edge.v1 import edge_admin_pb2
from hybridmesh.registry.v1 import registry_service_pb2
from services.access_rules import (
    CONTROL_PLANE_SERVICES,
    OPERATOR,
    RULES,
    Role,
    Verdict,
    decide,
    identity_of,
    methods_for,
    site_identity,
)

DESCRIPTORS = [
    registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"],
    edge_admin_pb2.DESCRIPTOR.services_by_name["EdgeAdminService"],
]
SITE = site_identity("store-042")


def test_every_rpc_of_every_control_plane_service_has_a_rule() -> None:
    assert {d.full_name for d in DESCRIPTORS} == set(CONTROL_PLANE_SERVICES)
    methods = {f"/{d.full_name}/{m.name}" for d in DESCRIPTORS for m in d.methods}
    assert methods == set(RULES), "a rule per RPC, and no rule for an RPC that is gone"
    assert all(RULES.values()), "every RPC is callable by someone"


def test_what_each_role_may_call() -> None:
    registry, admin = CONTROL_PLANE_SERVICES
    assert methods_for(Role.SITE, registry) == [
        "FetchFile",
        "GetManifest",
        "ListArtifacts",
        "ReportSiteStatus",
    ]
    assert methods_for(Role.SITE, admin) == []
    assert methods_for(Role.OPERATOR, registry) == [
        "FetchFile",
        "GetManifest",
        "ListArtifacts",
        "ListSites",
        "Promote",
        "Rollback",
    ]
    assert methods_for(Role.OPERATOR, admin) == ["CheckForUpdates", "GetUpdateStatus", "Rollback"]


@pytest.mark.parametrize("method", sorted(RULES))
def test_no_credential_is_unauthenticated_everywhere(method: str) -> None:
    assert decide(method, None) is Verdict.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("method", "verdict"),
    [
        ("/hybridmesh.registry.v1.RegistryService/Promote", Verdict.PERMISSION_DENIED),
        ("/hybridmesh.registry.v1.RegistryService/Rollback", Verdict.PERMISSION_DENIED),
        ("/hybridmesh.registry.v1.RegistryService/ListSites", Verdict.PERMISSION_DENIED),
        ("/hybridmesh.edge.v1.EdgeAdminService/Rollback", Verdict.PERMISSION_DENIED),
        ("/hybridmesh.edge.v1.EdgeAdminService/CheckForUpdates", Verdict.PERMISSION_DENIED),
        ("/hybridmesh.registry.v1.RegistryService/FetchFile", Verdict.ALLOW),
        ("/hybridmesh.registry.v1.RegistryService/ReportSiteStatus", Verdict.ALLOW),
        # A control-plane method without a rule is nobody's.
        ("/hybridmesh.registry.v1.RegistryService/Delete", Verdict.PERMISSION_DENIED),
        # Health, reflection and the data path are not the control plane's to guard.
        ("/grpc.health.v1.Health/Check", Verdict.OPEN),
        ("/hybridmesh.edge.v1.EdgeService/Infer", Verdict.OPEN),
    ],
)
def test_a_site_may_read_and_report_only(method: str, verdict: Verdict) -> None:
    assert decide(method, SITE) is verdict


def test_the_operator_is_not_a_site() -> None:
    method = "/hybridmesh.registry.v1.RegistryService/ReportSiteStatus"
    assert decide(method, OPERATOR) is Verdict.PERMISSION_DENIED
    assert decide("/hybridmesh.registry.v1.RegistryService/Promote", OPERATOR) is Verdict.ALLOW


@pytest.mark.parametrize(
    ("spiffe_id", "expected"),
    [
        ("spiffe://hybridmesh/operator", OPERATOR),
        ("spiffe://hybridmesh/site/store-042", SITE),
        ("spiffe://hybridmesh/site/", None),
        ("spiffe://hybridmesh/site/a/b", None),
        ("spiffe://other/operator", None),
        ("spiffe://hybridmesh/ingress", None),
        ("spiffe://hybridmesh/operator/extra", None),
    ],
)
def test_spiffe_ids(spiffe_id: str, expected: object) -> None:
    assert identity_of(spiffe_id) == expected
