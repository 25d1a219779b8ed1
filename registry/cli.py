"""The operator's command line for over-the-air updates.

  python -m registry.cli keygen  --keys DIR
  python -m registry.cli publish --root REGISTRY_DIR --keys DIR --name N --version V SRC
  python -m registry.cli list     --registry HOST:PORT
  python -m registry.cli promote  --registry HOST:PORT --keys DIR --kind model --name N --version V
  python -m registry.cli rollback --registry HOST:PORT --keys DIR --kind model --name N
  python -m registry.cli sites    --registry HOST:PORT
  python -m registry.cli edge-status   --edge HOST:PORT
  python -m registry.cli edge-rollback --edge HOST:PORT --name N

Publishing signs on the operator's machine with the private key and writes into the
registry's storage directory (the key never reaches the registry); promote and rollback
sign a promotion statement (``ota.promotions``, the next sequence number) with the same
key and send it; everything else talks gRPC to the registry or to one edge node.

Every gRPC command calls as the operator: ``--token-file`` (a bearer token, default
``$HYBRIDMESH_OPERATOR_TOKEN_FILE``) and/or ``--tls-dir`` (the operator's client
certificate: ca.crt, tls.crt, tls.key; default ``$HYBRIDMESH_OPERATOR_TLS_DIR``), e.g.
through the cloud ingress. ``hybridmesh registry ...`` fills in the local mesh's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc

from hybridmesh.edge.v1 import edge_admin_pb2, edge_admin_pb2_grpc
from hybridmesh.registry.v1 import registry_service_pb2 as pb
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from ota.artifacts import KINDS, ArtifactRef
from ota.promotions import parse_promotion
from ota.registry_client import KIND_NAMES, KIND_VALUES
from registry.signing import PRIVATE_KEY_FILE, generate_key, load_private_key, sign_promotion
from registry.store import RegistryStore
from services.auth import bearer_metadata, read_token
from services.channels import mtls_credentials

TIMEOUT_S = 30.0


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _wire(args: argparse.Namespace) -> pb.ArtifactRef:
    return pb.ArtifactRef(
        kind=KIND_VALUES[args.kind], name=args.name, version=getattr(args, "version", 0) or 0
    )


def _channel(target: str, args: argparse.Namespace) -> grpc.aio.Channel:
    credentials = mtls_credentials(args.tls_dir)
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


def _credentials(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return bearer_metadata(read_token(args.token_file))


async def _summary(
    stub: registry_service_pb2_grpc.RegistryServiceAsyncStub,
    args: argparse.Namespace,
) -> pb.ArtifactSummary:
    reply = await stub.ListArtifacts(
        pb.ListArtifactsRequest(), timeout=TIMEOUT_S, metadata=_credentials(args)
    )
    for summary in reply.artifacts:
        if summary.kind == KIND_VALUES[args.kind] and summary.name == args.name:
            return summary
    return pb.ArtifactSummary(kind=KIND_VALUES[args.kind], name=args.name)


async def _signed(
    stub: registry_service_pb2_grpc.RegistryServiceAsyncStub, args: argparse.Namespace, action: str
) -> tuple[pb.SignedPromotion, int]:
    """The next statement for the artifact (sequence one above the current one)."""
    if args.keys is None:
        raise SystemExit(f"{action} signs a statement: --keys DIR (or $HYBRIDMESH_OPERATOR_KEYS)")
    summary = await _summary(stub, args)
    statement = summary.promotion.statement
    sequence = parse_promotion(statement).sequence if statement else 0
    if action == "rollback":
        if not summary.previous_version:
            raise SystemExit(f"{args.kind} {args.name}: no earlier promoted version")
        version = summary.previous_version
    else:
        version = args.version
    key = load_private_key(args.keys / PRIVATE_KEY_FILE)
    signed = sign_promotion(key, args.kind, args.name, version, sequence + 1, action)
    return pb.SignedPromotion(statement=signed.statement, signature=signed.signature), version


async def _registry(args: argparse.Namespace) -> int:
    metadata = _credentials(args)
    async with _channel(args.registry, args) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        if args.command == "list":
            reply = await stub.ListArtifacts(
                pb.ListArtifactsRequest(), timeout=TIMEOUT_S, metadata=metadata
            )
            for a in reply.artifacts:
                promoted = a.promoted_version or "none"
                versions = list(a.versions)
                _out(f"{KIND_NAMES[a.kind]:14} {a.name:24} {versions} promoted {promoted}")
        elif args.command == "promote":
            signed, _ = await _signed(stub, args, "promote")
            request = pb.PromoteRequest(artifact=_wire(args), promotion=signed)
            done = await stub.Promote(request, timeout=TIMEOUT_S, metadata=metadata)
            _out(f"promoted {done.promoted.name} v{done.promoted.version}")
        elif args.command == "rollback":
            signed, _ = await _signed(stub, args, "rollback")
            back = await stub.Rollback(
                pb.RollbackRequest(artifact=_wire(args), promotion=signed),
                timeout=TIMEOUT_S,
                metadata=metadata,
            )
            _out(f"promoted {back.promoted.name} v{back.promoted.version} again")
        else:
            sites = await stub.ListSites(
                pb.ListSitesRequest(), timeout=TIMEOUT_S, metadata=metadata
            )
            for site in sites.sites:
                at = datetime.fromtimestamp(site.reported_at.ToSeconds(), UTC).isoformat()
                served = ", ".join(
                    f"{s.artifact.name} v{s.artifact.version}"
                    + (f" (refused {list(s.refused_versions)})" if s.refused_versions else "")
                    for s in site.served
                )
                _out(f"{site.site:20} {served}   reported {at}")
    return 0


async def _edge(args: argparse.Namespace) -> int:
    metadata = _credentials(args)
    async with _channel(args.edge, args) as channel:
        stub = edge_admin_pb2_grpc.EdgeAdminServiceStub(channel)
        if args.command == "edge-rollback":
            reply = await stub.Rollback(
                edge_admin_pb2.RollbackRequest(model=args.name),
                timeout=TIMEOUT_S,
                metadata=metadata,
            )
            _out(f"{reply.event.model}: {reply.event.outcome} to v{reply.event.version}")
            return 0
        status = await stub.GetUpdateStatus(
            edge_admin_pb2.GetUpdateStatusRequest(), timeout=TIMEOUT_S, metadata=metadata
        )
        _out(f"site {status.site}")
        for model in status.models:
            _out(
                f"  {model.model}: serving v{model.serving_version}, installed "
                f"{list(model.installed_versions)}, refused {list(model.refused_versions)}"
            )
        for event in status.recent_events:
            timings = " ".join(f"{k}={v:.1f}ms" for k, v in sorted(event.timings_ms.items()))
            _out(f"  {event.model} v{event.version} {event.outcome} {event.reason} {timings}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    key = load_private_key(args.keys / PRIVATE_KEY_FILE)
    ref = ArtifactRef(args.kind, args.name, args.version)
    manifest = RegistryStore(args.root).publish(args.source, ref, key)
    size = f"{len(manifest.files)} files, {manifest.total_bytes} bytes"
    _out(f"published {ref}: {size}, signed by key {key.key_id}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="create the operator's signing key pair")
    keygen.add_argument("--keys", type=Path, required=True)
    publish = commands.add_parser("publish", help="sign a version directory into the registry")
    publish.add_argument("--root", type=Path, required=True, help="the registry's storage")
    publish.add_argument("--keys", type=Path, required=True)
    publish.add_argument("source", type=Path)
    for name in ("list", "promote", "rollback", "sites"):
        command = commands.add_parser(name)
        command.add_argument("--registry", required=True, help="host:port")
    for command in (publish, commands.choices["promote"], commands.choices["rollback"]):
        command.add_argument("--kind", choices=KINDS, default="model")
        command.add_argument("--name", required=True)
    for command in (publish, commands.choices["promote"]):
        command.add_argument("--version", type=int, required=True)
    for name in ("edge-status", "edge-rollback"):
        command = commands.add_parser(name)
        command.add_argument("--edge", required=True, help="host:port of the edge node")
    commands.choices["edge-rollback"].add_argument("--name", required=True)
    for name in ("list", "promote", "rollback", "sites", "edge-status", "edge-rollback"):
        command = commands.choices[name]
        command.add_argument("--token-file", type=Path, default=_env_path("TOKEN_FILE"))
        command.add_argument("--tls-dir", type=Path, default=_env_path("TLS_DIR"))
    for name in ("promote", "rollback"):
        commands.choices[name].add_argument("--keys", type=Path, default=_env_path("KEYS"))
    return root


def _env_path(name: str) -> Path | None:
    value = os.environ.get(f"HYBRIDMESH_OPERATOR_{name}")
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "keygen":
            key = generate_key(args.keys)
            _out(
                f"key {key.key_id}: {args.keys / PRIVATE_KEY_FILE} (keep it secret), publisher.pub"
            )
            return 0
        if args.command == "publish":
            return _publish(args)
        if args.command.startswith("edge-"):
            return asyncio.run(_edge(args))
        return asyncio.run(_registry(args))
    except grpc.aio.AioRpcError as error:
        sys.stderr.write(f"{error.code().name}: {error.details()}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
