"""A private CA with a server certificate for the cloud ingress and client certificates
for the edge site and the operator: mTLS between site and cloud, generated on first start.

Client certificates carry SPIFFE-style identities in a URI SAN
(``services.access_rules``): ``spiffe://hybridmesh/site/<id>`` for the site,
``spiffe://hybridmesh/operator`` for the operator. The ingress certificate also names
``spiffe://hybridmesh/ingress`` and may act as a client: it is what Envoy presents to the
registry, the one peer whose ``x-forwarded-client-cert`` the registry believes."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.access_rules import INGRESS_ID, OPERATOR_ID, SITE_PREFIX

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class MeshCertificates:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @property
    def operator_cert(self) -> Path:
        return self.directory / "operator.crt"

    @property
    def operator_key(self) -> Path:
        return self.directory / "operator.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hybridmesh local mesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    common_name: str,
    usage: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def ensure_certificates(directory: Path, site: str = "site-local") -> MeshCertificates:
    """Create the CA, server and client certificates unless they already exist (a
    directory from before the operator's certificate is made anew)."""
    certificates = MeshCertificates(directory)
    if certificates.operator_key.exists():
        return certificates
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("hybridmesh local CA")
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server, server_key = _issue(
        ca_key,
        ca_name,
        "cloud ingress",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.UniformResourceIdentifier(INGRESS_ID),
        ],
    )
    client, client_key = _issue(
        ca_key,
        ca_name,
        site,
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.UniformResourceIdentifier(f"{SITE_PREFIX}{site}")],
    )
    operator, operator_key = _issue(
        ca_key,
        ca_name,
        "operator",
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        [x509.UniformResourceIdentifier(OPERATOR_ID)],
    )
    certificates.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certificates.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    certificates.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, certificates.server_key)
    _write_key(client_key, certificates.client_key)
    certificates.operator_cert.write_bytes(operator.public_bytes(serialization.Encoding.PEM))
    _write_key(operator_key, certificates.operator_key)
    return certificates
