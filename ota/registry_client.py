"""The registry as a site sees it: an ArtifactSource over gRPC, and site reports.

Also the wire form of artifact refs, which the registry's servicer shares."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from hybridmesh.registry.v1 import registry_service_pb2 as pb
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from ota.artifacts import ArtifactRef
from ota.promotions import SignedPromotion

CALL_TIMEOUT_S = 5.0
# A whole file streams under one deadline: generous, as a WAN link may be slow.
FILE_TIMEOUT_S = 300.0

KIND_NAMES = {pb.ARTIFACT_KIND_MODEL: "model", pb.ARTIFACT_KIND_ROUTER_POLICY: "router-policy"}
KIND_VALUES = {name: value for value, name in KIND_NAMES.items()}


def to_wire(ref: ArtifactRef) -> pb.ArtifactRef:
    return pb.ArtifactRef(kind=KIND_VALUES[ref.kind], name=ref.name, version=ref.version)


@dataclass(frozen=True)
class SiteServes:
    """One artifact a site serves, and the versions of it the site refused."""

    kind: str
    name: str
    version: int
    refused_versions: tuple[int, ...] = ()


class RegistryClient:
    """``metadata``: the site's credential on every call (``services.auth.bearer_metadata``;
    empty where the channel's client certificate is the credential)."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self._metadata = metadata

    async def promotion(self, kind: str, name: str) -> SignedPromotion | None:
        """The operator-signed statement of what ``kind`` ``name`` sites should run."""
        request = pb.ListArtifactsRequest()
        reply = await self._stub.ListArtifacts(
            request, timeout=CALL_TIMEOUT_S, metadata=self._metadata
        )
        for artifact in reply.artifacts:
            if artifact.kind == KIND_VALUES[kind] and artifact.name == name:
                signed = artifact.promotion
                if not signed.statement:
                    return None
                return SignedPromotion(signed.statement, signed.signature)
        return None

    async def manifest(self, ref: ArtifactRef) -> tuple[bytes, bytes]:
        reply = await self._stub.GetManifest(
            pb.GetManifestRequest(artifact=to_wire(ref)),
            timeout=CALL_TIMEOUT_S,
            metadata=self._metadata,
        )
        return reply.manifest, reply.signature

    async def stream_file(
        self, ref: ArtifactRef, path: str, offset: int, chunk_bytes: int
    ) -> AsyncIterator[bytes]:
        request = pb.FetchFileRequest(
            artifact=to_wire(ref), path=path, offset=offset, chunk_bytes=chunk_bytes
        )
        stream = self._stub.FetchFile(request, timeout=FILE_TIMEOUT_S, metadata=self._metadata)
        async for chunk in stream:
            yield chunk.data

    async def report_site(self, site: str, served: list[SiteServes]) -> None:
        status = pb.SiteStatus(
            site=site,
            served=[
                pb.ServedVersion(
                    artifact=to_wire(ArtifactRef(s.kind, s.name, s.version)),
                    refused_versions=s.refused_versions,
                )
                for s in served
            ],
        )
        status.reported_at.GetCurrentTime()
        await self._stub.ReportSiteStatus(
            pb.ReportSiteStatusRequest(status=status),
            timeout=CALL_TIMEOUT_S,
            metadata=self._metadata,
        )
