"""The test cluster's credentials: one CA, the API server's serving certificate, a client
certificate per identity, and the service-account signing key. ECDSA P-256 throughout (as fast
to make as to use; every component accepts it). Written as PEM files into one directory."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@attrs.frozen(kw_only=True)
class Pair:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class Pki:
    """A CA in ``dir`` that issues the cluster's certificates."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(hours=1)
        self._not_after = now + datetime.timedelta(days=2)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "podwire-test-ca")])
        self._ca_name = name
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = dir / "ca.crt"
        self.ca.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        sa = _key()
        self.sa_key = dir / "sa.key"
        _write_key(self.sa_key, sa)
        self.sa_pub = dir / "sa.pub"
        self.sa_pub.write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def issue(
        self,
        name: str,
        *,
        cn: str,
        orgs: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
    ) -> Pair:
        """Issue a certificate for ``cn`` (groups ``orgs``); with ``server``, for serving
        ``dns`` and ``ips`` as well. Returns the files ``<name>.crt`` and ``<name>.key``."""
        key = _key()
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
            [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if server:
            alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        pair = Pair(cert=self.dir / f"{name}.crt", key=self.dir / f"{name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(pair.key, key)
        return pair


def kubeconfig(path: Path, *, server: str, ca: Path, client: Pair, user: str) -> Path:
    """Write a kubeconfig for ``user`` (a client certificate) talking to ``server``."""
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: podwire-test
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {client.cert}
    client-key: {client.key}
contexts:
- name: {user}@podwire-test
  context:
    cluster: podwire-test
    user: {user}
current-context: {user}@podwire-test
"""
    )
    return path
