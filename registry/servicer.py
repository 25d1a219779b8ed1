"""Thin gRPC adapter over the registry store and the site book: validation and mapping.

Who may call what is ``services.access_rules`` (enforced by ``services.auth``'s
interceptor before a handler runs); a site's report is recorded under the site id of its
authenticated identity. Promotions and rollbacks are operator-signed statements
(``ota.promotions``) the registry stores and serves but cannot make.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hybridmesh.registry.v1 import registry_service_pb2 as pb
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from ota.artifacts import NAME, ArtifactError, ArtifactRef
from ota.promotions import PromotionError, SignedPromotion, verify_promotion
from ota.registry_client import KIND_NAMES, KIND_VALUES, SiteServes, to_wire
from registry.sites import SiteBook, SiteReport
from registry.store import NotFoundError, RegistryError, RegistryStore, StatementError
from services.access_rules import SITE_ID, Role
from services.auth import current_caller
from services.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    clip,
)
from services.errors import (
    NotFoundError as NotFoundStatus,
)
from services.logging import get_logger
from services.validation import check_timestamp, timestamp_at, unix_seconds

MAX_CHUNK_BYTES = 1 << 20
_log = get_logger("registry.servicer")

Context = grpc.aio.ServicerContext[Any, Any]


def artifact_ref(message: pb.ArtifactRef, field: str, *, version_zero_ok: bool) -> ArtifactRef:
    """Validate a wire ArtifactRef; errors name the field."""
    kind = KIND_NAMES.get(message.kind)
    if kind is None:
        raise InvalidArgumentError("must be MODEL or ROUTER_POLICY", field=f"{field}.kind")
    if not NAME.fullmatch(message.name):
        raise InvalidArgumentError(f"must match {NAME.pattern}", field=f"{field}.name")
    if message.version < 0 or (message.version == 0 and not version_zero_ok):
        raise InvalidArgumentError("must be a positive version", field=f"{field}.version")
    return ArtifactRef(kind, message.name, message.version)


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        store: RegistryStore,
        sites: SiteBook,
        default_chunk_bytes: int,
        trusted_keys: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        self._store = store
        self._sites = sites
        self._default_chunk = default_chunk_bytes
        self._trusted = dict(trusted_keys or {})

    async def ListArtifacts(  # noqa: N802 (gRPC method name)
        self, request: pb.ListArtifactsRequest, context: Context
    ) -> pb.ListArtifactsResponse:
        summaries = await asyncio.to_thread(self._store.summaries)
        return pb.ListArtifactsResponse(
            artifacts=[
                pb.ArtifactSummary(
                    kind=KIND_VALUES.get(s.kind, pb.ARTIFACT_KIND_UNSPECIFIED),
                    name=s.name,
                    versions=s.versions,
                    promoted_version=s.promoted or 0,
                    promotion=_signed_wire(s.promotion),
                    previous_version=s.previous or 0,
                )
                for s in summaries
                if s.kind in KIND_VALUES
            ]
        )

    async def GetManifest(  # noqa: N802 (gRPC method name)
        self, request: pb.GetManifestRequest, context: Context
    ) -> pb.GetManifestResponse:
        ref = artifact_ref(request.artifact, "artifact", version_zero_ok=True)
        if ref.version == 0:
            promoted = self._store.promoted(ref.kind, ref.name)
            if promoted is None:
                raise NotFoundStatus(f"{ref.kind} {ref.name}: nothing promoted", field="artifact")
            ref = ArtifactRef(ref.kind, ref.name, promoted)
        try:
            manifest, signature = await asyncio.to_thread(self._store.manifest, ref)
        except NotFoundError as error:
            raise NotFoundStatus(str(error), field="artifact") from None
        return pb.GetManifestResponse(artifact=to_wire(ref), manifest=manifest, signature=signature)

    async def FetchFile(  # noqa: N802 (gRPC method name)
        self, request: pb.FetchFileRequest, context: Context
    ) -> AsyncIterator[pb.FetchFileResponse]:
        ref = artifact_ref(request.artifact, "artifact", version_zero_ok=False)
        if request.offset < 0:
            raise InvalidArgumentError("must be >= 0", field="offset")
        if not 0 <= request.chunk_bytes <= MAX_CHUNK_BYTES:
            raise InvalidArgumentError(f"must be 0..{MAX_CHUNK_BYTES}", field="chunk_bytes")
        size = request.chunk_bytes or self._default_chunk
        offset = request.offset
        while True:
            try:
                data = await asyncio.to_thread(
                    self._store.read_chunk, ref, request.path, offset, size
                )
            except NotFoundError as error:
                raise NotFoundStatus(str(error), field="artifact") from None
            except ArtifactError as error:
                raise NotFoundStatus(str(error), field="path") from None
            except RegistryError as error:
                raise InvalidArgumentError(str(error), field="offset") from None
            if not data:
                return
            yield pb.FetchFileResponse(offset=offset, data=data)
            offset += len(data)

    async def Promote(  # noqa: N802 (gRPC method name)
        self, request: pb.PromoteRequest, context: Context
    ) -> pb.PromoteResponse:
        ref = artifact_ref(request.artifact, "artifact", version_zero_ok=False)
        await self._record(request.promotion, ref, "promote")
        return pb.PromoteResponse(promoted=to_wire(ref))

    async def Rollback(  # noqa: N802 (gRPC method name)
        self, request: pb.RollbackRequest, context: Context
    ) -> pb.RollbackResponse:
        ref = artifact_ref(request.artifact, "artifact", version_zero_ok=True)
        version = await self._record(request.promotion, ref, "rollback")
        return pb.RollbackResponse(promoted=to_wire(ArtifactRef(ref.kind, ref.name, version)))

    async def _record(self, wire: pb.SignedPromotion, ref: ArtifactRef, action: str) -> int:
        """Check an operator-signed statement against the request and store it; the
        version it promotes."""
        if not wire.statement or not wire.signature:
            raise InvalidArgumentError(
                f"an operator-signed {action} statement is required", field="promotion"
            )
        signed = SignedPromotion(wire.statement, wire.signature)
        try:
            promotion = (
                verify_promotion(self._trusted, signed, ref.kind, ref.name)
                if self._trusted
                else signed.promotion
            )
        except PromotionError as error:
            raise InvalidArgumentError(str(error), field="promotion") from None
        mismatch = (promotion.kind, promotion.name) != (ref.kind, ref.name) or (
            action == "promote" and promotion.version != ref.version
        )
        if mismatch or promotion.action != action:
            raise InvalidArgumentError(
                f"the statement ({promotion.action} {promotion.ref}) does not match the request",
                field="promotion",
            )
        try:
            await asyncio.to_thread(self._store.record, signed)
        except NotFoundError as error:
            raise NotFoundStatus(str(error), field="artifact.version") from None
        except (StatementError, RegistryError) as error:
            raise FailedPreconditionError(str(error), field="promotion") from None
        return promotion.version

    async def ReportSiteStatus(  # noqa: N802 (gRPC method name)
        self, request: pb.ReportSiteStatusRequest, context: Context
    ) -> pb.ReportSiteStatusResponse:
        status = request.status
        caller = current_caller()
        if caller is None or caller.role is not Role.SITE:
            raise UnauthenticatedError("only an authenticated site reports its status")
        # The site is who the credential says; a report naming another is refused.
        if status.site and status.site != caller.site:
            _log.warning(
                "control-plane call refused",
                method="/hybridmesh.registry.v1.RegistryService/ReportSiteStatus",
                identity=caller.spiffe_id,
                status="PERMISSION_DENIED",
                reason=f"report names site {clip(status.site)!r}",
                peer=context.peer(),
            )
            raise PermissionDeniedError(
                f"{clip(status.site)!r} is not this caller's site ({caller.site})",
                field="status.site",
            )
        if not SITE_ID.fullmatch(caller.site):
            raise InvalidArgumentError(f"must match {SITE_ID.pattern}", field="status.site")
        served = []
        for index, entry in enumerate(status.served):
            field = f"status.served[{index}]"
            ref = artifact_ref(entry.artifact, f"{field}.artifact", version_zero_ok=False)
            served.append(
                SiteServes(ref.kind, ref.name, ref.version, tuple(entry.refused_versions))
            )
        if status.HasField("reported_at"):
            check_timestamp(status.reported_at, "status.reported_at")
            reported_at = unix_seconds(status.reported_at)
        else:
            reported_at = time.time()
        self._sites.record(SiteReport(caller.site, tuple(served), reported_at))
        return pb.ReportSiteStatusResponse()

    async def ListSites(  # noqa: N802 (gRPC method name)
        self, request: pb.ListSitesRequest, context: Context
    ) -> pb.ListSitesResponse:
        sites = []
        for report in self._sites.reports():
            stamp = timestamp_at(report.reported_at)
            served = [
                pb.ServedVersion(
                    artifact=to_wire(ArtifactRef(s.kind, s.name, s.version)),
                    refused_versions=s.refused_versions,
                )
                for s in report.served
            ]
            sites.append(pb.SiteStatus(site=report.site, served=served, reported_at=stamp))
        return pb.ListSitesResponse(sites=sites)


def _signed_wire(signed: SignedPromotion | None) -> pb.SignedPromotion | None:
    if signed is None:
        return None
    return pb.SignedPromotion(statement=signed.statement, signature=signed.signature)
