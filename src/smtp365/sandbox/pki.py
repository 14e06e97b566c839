"""Private PKI of the sandbox: a CA, a server certificate and the token signing key,
plus the self-signed client certificates of app registrations (certificate credentials).

Everything lives in the state directory and is reused as long as it is still
valid, so a client configured once with ``ca.pem`` keeps working across
restarts. Private keys are written with mode 0600.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ClientCertificate",
    "Pki",
    "certificate_thumbprints",
    "ensure_client_certificate",
    "ensure_pki",
    "jwk_thumbprint",
    "load_token_key",
]

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"
TOKEN_KEY_FILE = "token-key.pem"

SERVER_DNS_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")
CLIENT_CERT_NAME = "client"
_CA_DAYS = 3650
_SERVER_DAYS = 397
_CLIENT_DAYS = 730
_RENEW_MARGIN = dt.timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Pki:
    """Absolute paths of the PEM files, plus the ``kid`` of the token signing key."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    token_key: Path
    token_kid: str


def ensure_pki(state_dir: Path) -> Pki:
    """Create (or reuse) the CA, the server certificate and the token key under ``state_dir``."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    ca_file = state_dir / CA_FILE
    ca_key_file = state_dir / CA_KEY_FILE
    cert_file = state_dir / SERVER_CERT_FILE
    key_file = state_dir / SERVER_KEY_FILE
    token_file = state_dir / TOKEN_KEY_FILE

    ca = _load_ca(ca_file, ca_key_file)
    if ca is None:
        ca = _make_ca()
        _write(ca_key_file, _key_pem(ca[1]), private=True)
        _write(ca_file, ca[0].public_bytes(serialization.Encoding.PEM))
        _unlink(cert_file)
    if not _server_cert_ok(cert_file, key_file, ca[0]):
        cert, key = _make_server_cert(*ca)
        _write(key_file, _key_pem(key), private=True)
        _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))

    try:
        token_key = load_token_key(token_file)
    except (OSError, ValueError):
        token_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write(token_file, _key_pem(token_key), private=True)

    return Pki(
        ca_file=ca_file,
        server_cert=cert_file,
        server_key=key_file,
        token_key=token_file,
        token_kid=jwk_thumbprint(token_key.public_key()),
    )


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A generated app credential: PEM certificate, PEM key (0600) and both as PKCS#12 (0600).

    ``thumbprint`` is the SHA-1 hex the Entra portal shows (MSAL's ``thumbprint``);
    ``thumbprint_sha256`` the SHA-256 hex (``x5t#S256``).
    """

    cert_file: Path
    key_file: Path
    pfx_file: Path
    thumbprint: str
    thumbprint_sha256: str


def certificate_thumbprints(cert: x509.Certificate) -> tuple[str, str]:
    """(SHA-1, SHA-256) fingerprints of ``cert`` as upper-case hex."""
    sha1 = cert.fingerprint(hashes.SHA1()).hex().upper()  # x5t is SHA-1 by RFC 7515
    return sha1, cert.fingerprint(hashes.SHA256()).hex().upper()


def ensure_client_certificate(
    state_dir: Path, name: str = CLIENT_CERT_NAME, *, subject: str = "smtp365 sandbox app"
) -> ClientCertificate:
    """Create (or reuse) a self-signed certificate credential ``{name}-cert.pem`` with its key
    ``{name}-key.pem`` and ``{name}-cert.pfx`` (no password) under ``state_dir``."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    cert_file = state_dir / f"{name}-cert.pem"
    key_file = state_dir / f"{name}-key.pem"
    pfx_file = state_dir / f"{name}-cert.pfx"
    loaded = _load_pair(cert_file, key_file)
    if loaded is None:
        loaded = _make_client_cert(subject)
        _write(key_file, _key_pem(loaded[1]), private=True)
        _write(cert_file, loaded[0].public_bytes(serialization.Encoding.PEM))
        _unlink(pfx_file)
    cert, key = loaded
    if not pfx_file.exists():
        pfx = pkcs12.serialize_key_and_certificates(
            subject.encode(), key, cert, None, serialization.NoEncryption()
        )
        _write(pfx_file, pfx, private=True)
    sha1, sha256 = certificate_thumbprints(cert)
    return ClientCertificate(cert_file, key_file, pfx_file, sha1, sha256)


def _load_pair(
    cert_file: Path, key_file: Path
) -> tuple[x509.Certificate, rsa.RSAPrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(
            key_file.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
        )
    except (OSError, ValueError):
        return None
    if not isinstance(key, rsa.RSAPrivateKey) or not _valid_now(cert):
        return None
    if not _same_key(cert, key):
        return None
    return cert, key


def _make_client_cert(subject: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=_CLIENT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_token_key(path: Path) -> rsa.RSAPrivateKey:
    """Load the RSA token signing key; ``ValueError`` if the file holds something else.

    Keys here are the sandbox's own, so the costly RSA consistency check is skipped
    (it took ~40 ms per key, paid at every start).
    """
    key = serialization.load_pem_private_key(
        Path(path).read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
    )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return key


def jwk_thumbprint(key: rsa.RSAPublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): a stable ``kid`` for the key."""
    numbers = key.public_numbers()
    members = {"e": _b64u_int(numbers.e), "kty": "RSA", "n": _b64u_int(numbers.n)}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":")).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _b64u_int(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _valid_now(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - _RENEW_MARGIN > now


def _load_ca(ca_file: Path, ca_key_file: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        key = serialization.load_pem_private_key(
            ca_key_file.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
        )
    except (OSError, ValueError):
        return None
    if not isinstance(key, rsa.RSAPrivateKey) or not _valid_now(cert):
        return None
    if not _same_key(cert, key):
        return None
    return cert, key


def _server_cert_ok(cert_file: Path, key_file: Path, ca: x509.Certificate) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(
            key_file.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
        )
    except (OSError, ValueError):
        return False
    if not isinstance(key, rsa.RSAPrivateKey) or not _valid_now(cert):
        return False
    if cert.issuer != ca.subject:
        return False
    return _same_key(cert, key)


def _same_key(cert: x509.Certificate, key: rsa.RSAPrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _make_ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "smtp365 sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, "smtp365 sandbox CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server_cert(
    ca_cert: x509.Certificate, ca_key: rsa.RSAPrivateKey
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_DNS_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "smtp365 sandbox"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key
