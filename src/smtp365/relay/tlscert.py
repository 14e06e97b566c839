"""A self-signed certificate for listeners that have none, made once and then reused.

Legacy devices rarely verify the relay's certificate, and a LAN relay often has no name a
public CA would sign; what matters is that the session is encrypted. The pair lives in
``<state_dir>/tls/`` (key 0600) and is reused on every start, so clients that pin it keep
working. Replace it by setting ``cert_file``/``key_file`` on the listener.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["self_signed"]

log = logging.getLogger("smtp365.relay.tls")

VALID_DAYS = 825  # the longest validity clients still accept for a leaf certificate


def self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """``(cert_file, key_file)`` in ``directory``: existing ones, else a new pair."""
    cert_file, key_file = directory / "relay.crt", directory / "relay.key"
    if cert_file.is_file() and key_file.is_file():
        return cert_file, key_file
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_file, key_pem, 0o600)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":")
    log.info(
        "made a self-signed certificate %s for %s (SHA-256 %s)", cert_file, hostname, fingerprint
    )
    return cert_file, key_file


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
