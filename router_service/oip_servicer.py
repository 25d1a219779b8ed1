"""Open Inference Protocol (KServe v2 gRPC, ``inference.GRPCInferenceService``): a
second thin adapter over the same ``Router`` as ``RouterService``.

Any Triton/KServe client (``tritonclient.grpc``) can call the router: ServerLive,
ServerReady, ServerMetadata, ModelReady, ModelMetadata and ModelInfer for every catalog
pair. The routing hints travel as request parameters and the decision comes back as
response parameters (``oip_conversion``); policy, breakers, privacy, admission and
audit are the router's own, shared with ``RouterService``. The other RPCs of the
service (repository, statistics, shared memory, streaming) are not registered, so
gRPC answers UNIMPLEMENTED.

The messages and method names are tritonclient's generated modules (Triton's published
``grpc_service.proto``), not a vendored copy: see ``oip_conversion``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as oip

from router_service.oip_conversion import (
    OIP_SERVICE_NAME,
    OipMessage,
    PairMetadata,
    check_model,
    model_metadata,
    renamed,
    to_model_infer_response,
    to_router_request,
)
from router_service.routing import Router
from services.admission import Admission
from services.errors import ServiceError

SERVER_NAME = "hybridmesh-router"
# What the server supports beyond the core protocol (KServe v2 "extensions").
EXTENSIONS = ("classification", "hybridmesh-routing-parameters")

Context = grpc.aio.ServicerContext[Any, Any]


def _version() -> str:
    try:
        return metadata.version("hybridmesh")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class OipServicer:
    """The six OIP calls a client needs to find, check and call a model pair."""

    def __init__(
        self,
        router: Router,
        admission: Admission,
        pairs: Mapping[str, PairMetadata],
        ready: Callable[[], bool],
    ) -> None:
        """``admission``: the same one RouterService uses (one limit for the router);
        ``ready``: whether some tier can answer (the router's health)."""
        self._router = router
        self._admission = admission
        self._pairs = dict(pairs)
        self._ready = ready
        self._version = _version()

    async def ServerLive(self, request: OipMessage, context: Context) -> OipMessage:  # noqa: N802
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: OipMessage, context: Context) -> OipMessage:  # noqa: N802
        return oip.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request: OipMessage, context: Context) -> OipMessage:  # noqa: N802
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=list(EXTENSIONS)
        )

    async def ModelReady(self, request: OipMessage, context: Context) -> OipMessage:  # noqa: N802
        check_model(request.name, request.version, self._pairs, prefix="")
        return oip.ModelReadyResponse(ready=self._ready())

    async def ModelMetadata(self, request: OipMessage, context: Context) -> OipMessage:  # noqa: N802
        return model_metadata(check_model(request.name, request.version, self._pairs, prefix=""))

    async def ModelInfer(self, request: OipMessage, context: Context) -> OipMessage:  # noqa: N802
        converted = to_router_request(request, self._pairs)
        async with self._admission.slot(context.time_remaining(), shed_when_late=True):
            try:
                response = await self._router.infer(converted.request, context.time_remaining())
            except ServiceError as error:
                raise renamed(
                    error, raw_inputs=converted.raw_inputs, top_k_field=converted.top_k_field
                ) from None
        return to_model_infer_response(response, converted)


_METHODS = {
    # method -> (request message, response message)
    "ServerLive": (oip.ServerLiveRequest, oip.ServerLiveResponse),
    "ServerReady": (oip.ServerReadyRequest, oip.ServerReadyResponse),
    "ServerMetadata": (oip.ServerMetadataRequest, oip.ServerMetadataResponse),
    "ModelReady": (oip.ModelReadyRequest, oip.ModelReadyResponse),
    "ModelMetadata": (oip.ModelMetadataRequest, oip.ModelMetadataResponse),
    "ModelInfer": (oip.ModelInferRequest, oip.ModelInferResponse),
}


def add_oip_servicer_to_server(servicer: OipServicer, server: grpc.aio.Server) -> None:
    """Register only the implemented methods (the rest: UNIMPLEMENTED, from gRPC)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in _METHODS.items()
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(OIP_SERVICE_NAME, handlers),)
    )
