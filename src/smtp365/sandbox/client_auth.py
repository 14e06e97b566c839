"""How a client proves who it is at the token endpoint: client secret (post or HTTP Basic),
or a client assertion (RFC 7523 JWT) signed with a key whose certificate is registered on
the app, found by its ``x5t`` (SHA-1), ``x5t#S256`` (SHA-256) or ``x5c`` header.

Public clients present nothing (``AADSTS700025`` if they do); confidential clients must
(``AADSTS7000218``). Checks and their order follow Entra ID: the key must be registered
(700027), valid (700027), sign correctly (700027); the assertion must be within its time
range (700024, five minutes of skew), for this token endpoint (700023), issued by and about
the client (700021).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from . import aadsts
from .pki import certificate_thumbprints
from .settings import AppSettings, SandboxSettings, stable_uuid

__all__ = ["ASSERTION_SKEW", "JWT_BEARER", "LOOPBACK_NAMES", "ClientAuthenticator"]

log = logging.getLogger("smtp365.sandbox.identity")

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ASSERTION_SKEW = 300


@dataclass(frozen=True, slots=True)
class _Credential:
    cert: x509.Certificate
    sha1: str
    sha256: str


def _is_time(value: object) -> TypeGuard[int | float]:
    """A NumericDate (RFC 7519 §2): a JSON number, finite; ``true`` is no number here."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _header_problem(header: Mapping[str, Any]) -> str | None:
    """What makes the key-identifying members of a JOSE header unusable (RFC 7515 §4.1)."""
    for name in ("alg", "x5t", "x5t#S256"):
        if name in header and not isinstance(header[name], str):
            return f"The '{name}' header must be a string."
    if "x5c" in header:
        chain = header["x5c"]
        if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
            return "The 'x5c' header must be an array of base64-encoded certificates."
    return None


def _b64u_hex(value: str) -> str | None:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw.hex().upper()


class ClientAuthenticator:
    """Authenticates the client of a token request; raises :class:`AadError` when it fails.

    ``port`` gives the identity platform's port (known once it listens), for the
    assertion's audience; ``now`` the wall clock.
    """

    def __init__(
        self,
        settings: SandboxSettings,
        *,
        now: Callable[[], float],
        port: Callable[[], int],
    ) -> None:
        self.settings = settings
        self._now = now
        self._port = port
        self._cert_cache: dict[tuple[str, int], list[x509.Certificate]] = {}

    def authenticate(
        self,
        app: AppSettings,
        form: Mapping[str, str],
        basic_secret: str | None,
        tenant: str,
        kind: str,
    ) -> None:
        secret = form.get("client_secret") or basic_secret
        assertion = form.get("client_assertion")
        if app.public_client:
            if secret or assertion:
                raise aadsts.public_client_credential()
            if kind == "client_credentials":
                raise aadsts.credential_required()
            return
        if secret:
            expected = app.client_secret or ""
            if not expected or not hmac.compare_digest(secret.encode(), expected.encode()):
                raise aadsts.invalid_client_secret(app.app_id)
            return
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise aadsts.missing_parameter("client_assertion_type")
            self._verify_assertion(app, assertion, tenant)
            return
        raise aadsts.credential_required()

    def _credentials(self, app: AppSettings) -> list[_Credential]:
        found: list[_Credential] = []
        for name in app.certificates or []:
            path = Path(name)
            try:
                key = (str(path), path.stat().st_mtime_ns)
                certs = self._cert_cache.get(key)
                if certs is None:
                    certs = x509.load_pem_x509_certificates(path.read_bytes())
                    self._cert_cache[key] = certs
            except (OSError, ValueError) as exc:
                log.warning("app %s: certificate %s unusable: %s", app.app_id, name, exc)
                continue
            for cert in certs:
                sha1, sha256 = certificate_thumbprints(cert)
                found.append(_Credential(cert, sha1, sha256))
        return found

    def _verify_assertion(self, app: AppSettings, assertion: str, tenant: str) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise aadsts.assertion_malformed(str(exc)) from None
        problem = _header_problem(header)
        if problem is not None:
            raise aadsts.assertion_malformed(problem)
        alg = header.get("alg", "")
        if alg not in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"):
            raise aadsts.assertion_malformed(f"The signing algorithm '{alg}' is not supported.")
        credentials = self._credentials(app)
        used: str | None = None
        match: _Credential | None = None
        if isinstance(header.get("x5t#S256"), str):
            used = _b64u_hex(header["x5t#S256"])
            match = next((c for c in credentials if c.sha256 == used), None)
        elif isinstance(header.get("x5t"), str):
            used = _b64u_hex(header["x5t"])
            match = next((c for c in credentials if c.sha1 == used), None)
        elif "x5c" in header:
            try:
                leaf = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
            except (ValueError, binascii.Error):
                leaf = None
            if leaf is not None:
                used = certificate_thumbprints(leaf)[0]
                match = next((c for c in credentials if c.sha1 == used), None)
        object_id = app.object_id or stable_uuid(self.settings.tenant_id, "sp", app.app_id)
        if match is None:
            raise aadsts.certificate_not_registered(used, app.app_id, object_id)
        cert = match.cert
        start, end = (
            aadsts.cert_date(cert.not_valid_before_utc),
            aadsts.cert_date(cert.not_valid_after_utc),
        )
        now = self._now()
        if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
            raise aadsts.assertion_key_expired(used or match.sha1, start, end)
        public_key = cert.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise aadsts.assertion_invalid_signature(used or match.sha1, start, end)
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                public_key,
                algorithms=[alg],
                options={
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise aadsts.assertion_invalid_signature(used or match.sha1, start, end) from None
        except jwt.PyJWTError as exc:
            raise aadsts.assertion_malformed(str(exc)) from None
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not _is_time(exp):
            raise aadsts.assertion_malformed("The token has no valid 'exp' claim.")
        if not _is_time(nbf):
            raise aadsts.assertion_malformed("The token has no valid 'nbf' claim.")
        if exp + ASSERTION_SKEW < now or nbf - ASSERTION_SKEW > now:
            raise aadsts.assertion_time_range(aadsts.iso7(now), aadsts.iso7(nbf), aadsts.iso7(exp))
        audiences = claims.get("aud")
        auds = audiences if isinstance(audiences, list) else [audiences]
        if not any(isinstance(a, str) and self._is_token_endpoint(a, tenant) for a in auds):
            raise aadsts.assertion_audience()
        wanted = app.app_id.lower()
        iss, sub = claims.get("iss"), claims.get("sub")
        if not (isinstance(iss, str) and isinstance(sub, str)) or not (
            iss.lower() == sub.lower() == wanted
        ):
            raise aadsts.assertion_subject()

    def _is_token_endpoint(self, aud: str, tenant: str) -> bool:
        try:
            parts = urlsplit(aud)
            port = parts.port
        except ValueError:
            return False
        if parts.scheme != "https" or parts.hostname not in LOOPBACK_NAMES or port != self._port():
            return False
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) < 3 or "/".join(segments[1:]) not in ("oauth2/v2.0/token", "oauth2/token"):
            return False
        aliases = {tenant, self.settings.tenant_id.lower(), *self.settings.domains}
        return segments[0].lower() in aliases
