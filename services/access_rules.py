"""Who may call what on the control plane: identities, roles and the rule table.

Pure (no gRPC, no I/O). Two roles:

- ``operator`` (``spiffe://hybridmesh/operator``): promote, roll back, list sites, and
  every edge node's admin service; it also reads artifacts;
- ``site`` (``spiffe://hybridmesh/site/<id>``): reads manifests and files and reports its
  own status; the site id is taken from the identity, never from the message.

A method missing from ``RULES`` is refused to everyone (``tests/test_access_rules.py``
walks every control-plane service's descriptor, so a new RPC without a rule fails there);
``deploy/k8s/base/envoy/envoy-config.yaml`` routes by the same table (RBAC on the client
certificate's URI SAN).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

TRUST_DOMAIN = "hybridmesh"
SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
OPERATOR_ID = f"{SPIFFE_PREFIX}operator"
SITE_PREFIX = f"{SPIFFE_PREFIX}site/"
# The cloud ingress (Envoy): the one peer whose x-forwarded-client-cert is believed.
INGRESS_ID = f"{SPIFFE_PREFIX}ingress"
SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

REGISTRY_SERVICE = "hybridmesh.registry.v1.RegistryService"
EDGE_ADMIN_SERVICE = "hybridmesh.edge.v1.EdgeAdminService"
CONTROL_PLANE_SERVICES = (REGISTRY_SERVICE, EDGE_ADMIN_SERVICE)
# Probes and tooling carry no credential: health and reflection stay open.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class Role(enum.StrEnum):
    OPERATOR = "operator"
    SITE = "site"


OPERATOR_ONLY = frozenset({Role.OPERATOR})
SITE_ONLY = frozenset({Role.SITE})
READERS = frozenset({Role.OPERATOR, Role.SITE})

RULES: Mapping[str, frozenset[Role]] = {
    f"/{REGISTRY_SERVICE}/ListArtifacts": READERS,
    f"/{REGISTRY_SERVICE}/GetManifest": READERS,
    f"/{REGISTRY_SERVICE}/FetchFile": READERS,
    f"/{REGISTRY_SERVICE}/Promote": OPERATOR_ONLY,
    f"/{REGISTRY_SERVICE}/Rollback": OPERATOR_ONLY,
    # A site reports for itself only; the operator is not a site.
    f"/{REGISTRY_SERVICE}/ReportSiteStatus": SITE_ONLY,
    f"/{REGISTRY_SERVICE}/ListSites": OPERATOR_ONLY,
    f"/{EDGE_ADMIN_SERVICE}/GetUpdateStatus": OPERATOR_ONLY,
    f"/{EDGE_ADMIN_SERVICE}/CheckForUpdates": OPERATOR_ONLY,
    f"/{EDGE_ADMIN_SERVICE}/Rollback": OPERATOR_ONLY,
}


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: its role and, for a site, its id."""

    role: Role
    site: str = ""

    @property
    def spiffe_id(self) -> str:
        return OPERATOR_ID if self.role is Role.OPERATOR else f"{SITE_PREFIX}{self.site}"


OPERATOR = Identity(Role.OPERATOR)


def site_identity(site: str) -> Identity:
    if not SITE_ID.fullmatch(site):
        raise ValueError(f"site id {site!r} must match {SITE_ID.pattern}")
    return Identity(Role.SITE, site)


def identity_of(spiffe_id: str) -> Identity | None:
    """The identity a SPIFFE id names, or None (another trust domain, path or a bad id)."""
    if spiffe_id == OPERATOR_ID:
        return OPERATOR
    if spiffe_id.startswith(SITE_PREFIX):
        site = spiffe_id[len(SITE_PREFIX) :]
        return Identity(Role.SITE, site) if SITE_ID.fullmatch(site) else None
    return None


class Verdict(enum.Enum):
    OPEN = "open"  # health, reflection: no credential needed
    ALLOW = "allow"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"


def is_control_plane(method: str) -> bool:
    """Whether ``method`` ("/package.Service/Method") belongs to a control-plane service
    (the data path beside it on the same server has its own rules)."""
    return method.startswith(tuple(f"/{service}/" for service in CONTROL_PLANE_SERVICES))


def decide(method: str, caller: Identity | None) -> Verdict:
    if method.startswith(OPEN_SERVICES) or not is_control_plane(method):
        return Verdict.OPEN
    if caller is None:
        return Verdict.UNAUTHENTICATED
    if caller.role in RULES.get(method, frozenset()):
        return Verdict.ALLOW
    return Verdict.PERMISSION_DENIED


def methods_for(role: Role, service: str) -> list[str]:
    """The RPC names of ``service`` that ``role`` may call (Envoy's RBAC, the docs)."""
    prefix = f"/{service}/"
    return sorted(
        method[len(prefix) :]
        for method, roles in RULES.items()
        if method.startswith(prefix) and role in roles
    )
