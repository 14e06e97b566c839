"""RS256 access tokens shaped like Microsoft Entra ID's, and their verification.

The issuer is a plain class over the persisted signing key so that the SMTP
server, another process (the CLI's ``sandbox token``) and, later, the sandbox's
identity platform endpoints mint and check the same tokens.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .pki import TOKEN_KEY_FILE, jwk_thumbprint, load_token_key
from .settings import DEFAULT_APP_ID, DEFAULT_TENANT_ID, stable_uuid

__all__ = [
    "ACCEPTED_AUDIENCES",
    "DEFAULT_AUDIENCE",
    "EXCHANGE_APP_ID",
    "TokenError",
    "TokenIssuer",
]

DEFAULT_AUDIENCE = "https://outlook.office365.com"
EXCHANGE_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
ACCEPTED_AUDIENCES: tuple[str, ...] = (
    DEFAULT_AUDIENCE,
    "https://outlook.office.com",
    EXCHANGE_APP_ID,
)
DELEGATED_SCOPE = "SMTP.Send"
APP_ROLE = "SMTP.SendAsApp"
# Entra ID back-dates iat/nbf by five minutes to absorb clock skew.
_BACKDATE = 300


class TokenError(Exception):
    """A token was refused; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _short_scope(scope: str) -> str:
    """``https://outlook.office.com/SMTP.Send`` → ``SMTP.Send`` (Entra puts short names in scp)."""
    return scope.rstrip("/").rsplit("/", 1)[-1]


class TokenIssuer:
    """Mints and verifies the sandbox's access tokens.

    ``issued``, ``verified`` and ``rejected`` count calls; ``distinct_verified``
    counts different tokens (by ``uti``) that passed verification, which is what
    "N sends cost one token" is checked against.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        tenant_id: str = DEFAULT_TENANT_ID,
        issuer: str | None = None,
        default_app_id: str = DEFAULT_APP_ID,
        audience: str = DEFAULT_AUDIENCE,
        accepted_audiences: Iterable[str] = ACCEPTED_AUDIENCES,
    ) -> None:
        self.key_file = Path(state_dir).resolve() / TOKEN_KEY_FILE
        self._key: rsa.RSAPrivateKey = load_token_key(self.key_file)
        self.kid = jwk_thumbprint(self._key.public_key())
        self.tenant_id = tenant_id
        self.issuer = issuer or f"https://sandbox.smtp365.test/{tenant_id}/v2.0"
        self.default_app_id = default_app_id
        self.audience = audience
        self.accepted_audiences = tuple(accepted_audiences)
        self._lock = threading.Lock()
        self.issued = 0
        self.verified = 0
        self.rejected = 0
        self._seen: set[str] = set()

    @property
    def distinct_verified(self) -> int:
        with self._lock:
            return len(self._seen)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self._key.public_key()

    def jwks(self) -> dict[str, Any]:
        """The public key as a JWK set (for an OIDC ``jwks_uri``)."""
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.public_key, as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def issue(
        self,
        upn: str | None = None,
        *,
        app_only: bool = False,
        app_id: str | None = None,
        lifetime: int = 3600,
        audience: str | None = None,
        scopes: Sequence[str] | None = None,
        tenant_id: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        """Mint a token.

        Delegated (default): ``upn`` is required and ends up in ``upn``,
        ``preferred_username`` and ``unique_name``; ``scopes`` (default
        ``["SMTP.Send"]``) become the space-separated ``scp``. App-only:
        ``scopes`` (default ``["SMTP.SendAsApp"]``) become ``roles`` and the
        token names no user (no ``roles`` claim at all when ``scopes`` is empty, as Entra ID
        does for an app without granted permissions). ``lifetime`` may be negative to mint an
        expired one.
        """
        issued_at = int(now if now is not None else time.time())
        tid = tenant_id or self.tenant_id
        appid = app_id or self.default_app_id
        claims: dict[str, Any] = {
            "aud": audience or self.audience,
            "iss": self.issuer,
            "iat": issued_at - _BACKDATE,
            "nbf": issued_at - _BACKDATE,
            "exp": issued_at + lifetime,
            "tid": tid,
            "appid": appid,
            "azp": appid,
            "app_displayname": "smtp365 sandbox app",
            "uti": secrets.token_urlsafe(16),
            "ver": "2.0",
        }
        names = [_short_scope(s) for s in scopes] if scopes is not None else None
        if app_only:
            oid = stable_uuid(tid, "sp", appid)
            claims.update({"idtyp": "app", "oid": oid, "sub": oid})
            roles = names if names is not None else [APP_ROLE]
            if roles:
                claims["roles"] = roles
        else:
            if not upn:
                raise ValueError("a delegated token needs the user's upn")
            oid = stable_uuid(tid, "user", upn)
            claims.update(
                {
                    "idtyp": "user",
                    "oid": oid,
                    "sub": oid,
                    "upn": upn,
                    "preferred_username": upn,
                    "unique_name": upn,
                    "scp": " ".join(names if names is not None else [DELEGATED_SCOPE]),
                }
            )
        if extra_claims:
            claims.update(extra_claims)
        token = self.sign(claims)
        with self._lock:
            self.issued += 1
        return token

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Sign arbitrary claims with the token key (ID tokens); not counted in ``issued``."""
        return jwt.encode(dict(claims), self._key, algorithm="RS256", headers={"kid": self.kid})

    def derive_secret(self, label: str) -> bytes:
        """32 bytes derived from the persisted signing key, stable across restarts."""
        der = self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return hashlib.sha256(label.encode() + b"\0" + der).digest()

    def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        """Check signature, time window, issuer, audience, tenant and SMTP permission.

        Returns the claims; raises :class:`TokenError` otherwise.
        """
        try:
            claims = self._decode(token, now)
        except TokenError:
            with self._lock:
                self.rejected += 1
            raise
        with self._lock:
            self.verified += 1
            self._seen.add(str(claims.get("uti", token)))
        return claims

    def _decode(self, token: str, now: float | None) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("malformed", str(exc)) from None
        if header.get("kid") not in (None, self.kid):
            raise TokenError("unknown_key", f"kid {header.get('kid')!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.public_key,
                algorithms=["RS256"],
                audience=list(self.accepted_audiences),
                issuer=self.issuer,
                options={
                    "require": ["exp", "iat", "nbf", "aud", "iss", "tid"],
                    "verify_exp": now is None,
                    "verify_nbf": now is None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise TokenError("audience") from None
        except jwt.InvalidIssuerError:
            raise TokenError("issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenError("signature") from None
        except jwt.PyJWTError as exc:
            raise TokenError("invalid", str(exc)) from None
        if now is not None:
            if claims["exp"] <= now:
                raise TokenError("expired")
            if claims["nbf"] > now:
                raise TokenError("not_yet_valid")
        if claims.get("tid") != self.tenant_id:
            raise TokenError("tenant", f"tid {claims.get('tid')!r}")
        if "scp" in claims:
            if DELEGATED_SCOPE not in str(claims["scp"]).split():
                raise TokenError("scope", f"scp {claims['scp']!r} lacks {DELEGATED_SCOPE}")
            if not (claims.get("upn") or claims.get("preferred_username")):
                raise TokenError("invalid", "delegated token without upn")
        else:
            roles = claims.get("roles")
            if not isinstance(roles, list) or APP_ROLE not in roles:
                raise TokenError("scope", f"roles {roles!r} lack {APP_ROLE}")
        return claims

    @staticmethod
    def is_app_only(claims: Mapping[str, Any]) -> bool:
        return "scp" not in claims
