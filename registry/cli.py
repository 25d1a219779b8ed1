"""hybridmesh registry: the operator's command line for over-the-air updates.

  hybridmesh registry keygen  --keys DIR
  hybridmesh registry publish --root REGISTRY_DIR --keys DIR --name N --version V SRC
  hybridmesh registry list     --registry HOST:PORT
  hybridmesh registry promote  --registry HOST:PORT --keys DIR --kind model --name N --version V
  hybridmesh registry rollback --registry HOST:PORT --keys DIR --kind model --name N
  hybridmesh registry sites    --registry HOST:PORT
  hybridmesh registry edge-status   --edge HOST:PORT
  hybridmesh registry edge-rollback --edge HOST:PORT --name N

Publishing signs on the operator's machine with the private key and writes into the
registry's storage directory (the key never reaches the registry); promote and rollback
sign a promotion statement (``ota.promotions``, the next sequence number) with the same
key and send it; everything else talks gRPC to the registry or to one edge node.

Every gRPC command calls as the operator: --token-file (a bearer token, default
$HYBRIDMESH_OPERATOR_TOKEN_FILE) and/or --tls-dir (the operator's client certificate:
ca.crt, tls.crt, tls.key; default $HYBRIDMESH_OPERATOR_TLS_DIR), e.g. through the cloud
ingress; --keys defaults to $HYBRIDMESH_OPERATOR_KEYS. Unset, they fall back to the local
mesh's operator (under --state-dir).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import grpc

from hybridmesh.edge.v1 import edge_admin_pb2, edge_admin_pb2_grpc
from hybridmesh.registry.v1 import registry_service_pb2 as pb
from hybridmesh.registry.v1 import registry_service_pb2_grpc
from ota.artifacts import KINDS, ArtifactError, ArtifactRef
from ota.promotions import parse_promotion
from ota.registry_client import KIND_NAMES, KIND_VALUES
from ota.signatures import SignatureError
from registry.signing import PRIVATE_KEY_FILE, generate_key, load_private_key, sign_promotion
from registry.store import RegistryError, RegistryStore
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
        if args.registry_command == "list":
            reply = await stub.ListArtifacts(
                pb.ListArtifactsRequest(), timeout=TIMEOUT_S, metadata=metadata
            )
            for a in reply.artifacts:
                promoted = a.promoted_version or "none"
                versions = list(a.versions)
                _out(f"{KIND_NAMES[a.kind]:14} {a.name:24} {versions} promoted {promoted}")
        elif args.registry_command == "promote":
            signed, _ = await _signed(stub, args, "promote")
            request = pb.PromoteRequest(artifact=_wire(args), promotion=signed)
            done = await stub.Promote(request, timeout=TIMEOUT_S, metadata=metadata)
            _out(f"promoted {done.promoted.name} v{done.promoted.version}")
        elif args.registry_command == "rollback":
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
        if args.registry_command == "edge-rollback":
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


ARTIFACT_HELP = {
    "--kind": "the artifact's kind (default %(default)s)",
    "--name": "the artifact's name: a model's, or a pair's for a policy",
}
CREDENTIAL_HELP = {
    "--token-file": "file holding the operator's bearer token "
    "(default $HYBRIDMESH_OPERATOR_TOKEN_FILE, else the local mesh's)",
    "--tls-dir": "the operator's client certificate directory: ca.crt, tls.crt, tls.key "
    "(default $HYBRIDMESH_OPERATOR_TLS_DIR; unset: plaintext)",
}


def add_commands(registry: argparse.ArgumentParser) -> None:
    """The ``registry`` subcommands, onto ``registry`` (``hybridmesh registry``); the
    chosen one is ``args.registry_command``, run by :func:`run`."""
    commands = registry.add_subparsers(
        dest="registry_command", required=True, metavar="COMMAND", help="the registry command"
    )
    keygen = commands.add_parser(
        "keygen",
        help="create the operator's signing key pair",
        description="Write publisher.key (mode 0600, keep it secret) and publisher.pub.",
    )
    keygen.add_argument("--keys", type=Path, required=True, help="directory for the key pair")
    publish = commands.add_parser(
        "publish",
        help="sign a version directory into the registry's storage",
        description="Sign SOURCE (a version directory) with the operator's key and write it "
        "into the registry's storage; versions are immutable.",
    )
    publish.add_argument("--root", type=Path, required=True, help="the registry's storage")
    publish.add_argument(
        "--keys", type=Path, required=True, help="the operator's key directory (publisher.key)"
    )
    publish.add_argument("source", type=Path, help="the version directory to publish")
    for name, summary in (
        ("list", "every artifact with its versions and the promoted one"),
        ("promote", "sign and send a promotion of one version: sites switch to it"),
        ("rollback", "sign and send a promotion of the previously promoted version"),
        ("sites", "every site's report: what it serves and what it refused"),
    ):
        command = commands.add_parser(
            name, help=summary, description=summary[0].upper() + summary[1:] + "."
        )
        command.add_argument("--registry", required=True, help="the registry's host:port")
    for command in (publish, commands.choices["promote"], commands.choices["rollback"]):
        command.add_argument("--kind", choices=KINDS, default="model", help=ARTIFACT_HELP["--kind"])
        command.add_argument("--name", required=True, help=ARTIFACT_HELP["--name"])
    for command in (publish, commands.choices["promote"]):
        command.add_argument("--version", type=int, required=True, help="the version number")
    for name, summary in (
        ("edge-status", "one edge node's models, installed and refused versions, recent events"),
        ("edge-rollback", "switch one edge node's model back to its previous version"),
    ):
        command = commands.add_parser(
            name, help=summary, description=summary[0].upper() + summary[1:] + "."
        )
        command.add_argument("--edge", required=True, help="the edge node's host:port")
    commands.choices["edge-rollback"].add_argument(
        "--name", required=True, help="the model to roll back"
    )
    for name in ("list", "promote", "rollback", "sites", "edge-status", "edge-rollback"):
        command = commands.choices[name]
        for flag, text in CREDENTIAL_HELP.items():
            command.add_argument(flag, type=Path, help=text)
    for name in ("promote", "rollback"):
        commands.choices[name].add_argument(
            "--keys",
            type=Path,
            help="the operator's key directory, to sign the statement "
            "(default $HYBRIDMESH_OPERATOR_KEYS, else the local mesh's)",
        )


def _env_path(name: str) -> Path | None:
    value = os.environ.get(f"HYBRIDMESH_OPERATOR_{name}")
    return Path(value) if value else None


def _with_defaults(args: argparse.Namespace, fallback: Mapping[str, Path]) -> None:
    """Unset credentials from $HYBRIDMESH_OPERATOR_*, else from ``fallback`` (attribute ->
    path); read after parsing, so the caller may derive them from options (``--state-dir``)."""
    for attribute in ("token_file", "tls_dir", "keys"):
        if hasattr(args, attribute) and getattr(args, attribute) is None:
            setattr(args, attribute, _env_path(attribute.upper()) or fallback.get(attribute))


def run(args: argparse.Namespace, fallback: Mapping[str, Path] | None = None) -> int:
    """Run the parsed ``hybridmesh registry`` command: 0 done, 1 the server refused (its
    status and message on stderr), 2 a local problem (a missing or unreadable file, a bad
    key, an artifact already published), one line on stderr. ``fallback``: credentials
    for options neither given nor in the environment (``token_file``, ``keys``)."""
    _with_defaults(args, fallback or {})
    try:
        if args.registry_command == "keygen":
            key = generate_key(args.keys)
            _out(
                f"key {key.key_id}: {args.keys / PRIVATE_KEY_FILE} (keep it secret), publisher.pub"
            )
            return 0
        if args.registry_command == "publish":
            return _publish(args)
        if args.registry_command.startswith("edge-"):
            return asyncio.run(_edge(args))
        return asyncio.run(_registry(args))
    except grpc.aio.AioRpcError as error:
        sys.stderr.write(f"{error.code().name}: {error.details()}\n")
        return 1
    except OSError as error:
        where = f"{error.filename}: {error.strerror}" if error.filename else str(error)
        sys.stderr.write(f"hybridmesh registry: error: {where}\n")
        return 2
    except (RegistryError, ArtifactError, SignatureError) as error:
        sys.stderr.write(f"hybridmesh registry: error: {error}\n")
        return 2


if __name__ == "__main__":
    # ``python -m registry.cli`` (named in older deploy notes) is ``hybridmesh registry``.
    from localmesh.cli import main

    sys.exit(main(["registry", *sys.argv[1:]]))
