"""Entra ID error answers (``AADSTS`` codes) as the sandbox's identity platform sends them.

Texts are literal, copied from Microsoft's public error reference and from real server
answers quoted in public bug reports, never derived from the client side's catalogue: a
client that parses them wrongly fails against the sandbox as it would against Entra ID.
Each function returns an :class:`AadError` to raise; the identity platform renders it as
Entra's JSON (``error``, ``error_description``, ``error_codes``, ``timestamp``,
``trace_id``, ``correlation_id``, ``error_uri``), as a redirect, or on an HTML page.
"""

from __future__ import annotations

import datetime as dt

__all__ = ["AadError", "cert_date", "iso7"]


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_FIRST = (dt.datetime(1, 1, 1, tzinfo=dt.UTC) - _EPOCH).total_seconds()
_LAST = (dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC) - _EPOCH).total_seconds()


def iso7(when: float) -> str:
    """``2020-12-11T09:41:15.6470000Z``: how AADSTS texts write a moment.

    ``when`` may come from a client (an assertion's ``nbf`` of 1e300): a moment before year 1
    or after 9999 is written as the first or last second a date can hold.
    """
    if not when >= _FIRST:  # NaN included
        when = _FIRST
    elif when > _LAST:
        when = _LAST
    moment = _EPOCH + dt.timedelta(seconds=when)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "0Z"


def cert_date(when: dt.datetime) -> str:
    """``08/18/2024 19:33:23``: how AADSTS700027 writes a key's validity."""
    return when.strftime("%m/%d/%Y %H:%M:%S")


class AadError(Exception):
    """One Entra ID error: OAuth ``error`` word, AADSTS ``code``, text and HTTP status."""

    def __init__(
        self,
        code: int,
        error: str,
        text: str,
        *,
        status: int = 400,
        suberror: str | None = None,
        claims: str | None = None,
    ) -> None:
        super().__init__(f"AADSTS{code}: {text}")
        self.code = code
        self.error = error
        self.text = text
        self.status = status
        self.suberror = suberror
        self.claims = claims

    @property
    def label(self) -> str:
        """``AADSTS7000215``: the key of :attr:`IdentityStats.errors`."""
        return f"AADSTS{self.code}"

    @property
    def description(self) -> str:
        return f"AADSTS{self.code}: {self.text}"


_CERT_DOCS = (
    "Review the documentation at "
    "https://learn.microsoft.com/entra/identity-platform/certificate-credentials ."
)


# ----------------------------------------------------------------- request shape


def missing_parameter(name: str) -> AadError:
    return AadError(
        900144,
        "invalid_request",
        f"The request body must contain the following parameter: '{name}'.",
    )


def malformed_request() -> AadError:
    return AadError(9002313, "invalid_grant", "Invalid request. Request is malformed or invalid.")


def unsupported_grant_type(grant_type: str) -> AadError:
    return AadError(
        70003,
        "unsupported_grant_type",
        f"The app requested an unsupported grant type '{grant_type}'.",
    )


def tenant_not_found(tenant: str, *, error: str = "invalid_request") -> AadError:
    return AadError(
        90002,
        error,
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
        "signing into the correct cloud. Check with your subscription administrator, this may "
        "happen if there are no active subscriptions for the tenant.",
    )


def invalid_instance() -> AadError:
    return AadError(50049, "invalid_instance", "Unknown or invalid instance.")


def no_tenant_information() -> AadError:
    return AadError(
        50059,
        "invalid_request",
        "No tenant-identifying information found in either the request or implied by any "
        "provided credentials.",
    )


# ------------------------------------------------------------------- the client


def app_not_found(app_id: str, tenant: str) -> AadError:
    return AadError(
        700016,
        "unauthorized_client",
        f"Application with identifier '{app_id}' was not found in the directory '{tenant}'. "
        "This can happen if the application has not been installed by the administrator of "
        "the tenant or consented to by any user in the tenant. You may have sent your "
        "authentication request to the wrong tenant.",
    )


def invalid_client_secret(app_id: str) -> AadError:
    return AadError(
        7000215,
        "invalid_client",
        "Invalid client secret provided. Ensure the secret being sent in the request is the "
        f"client secret value, not the client secret ID, for a secret added to app '{app_id}'.",
        status=401,
    )


def credential_required() -> AadError:
    return AadError(
        7000218,
        "invalid_client",
        "The request body must contain the following parameter: 'client_assertion' or "
        "'client_secret'.",
        status=401,
    )


def public_client_credential() -> AadError:
    return AadError(
        700025,
        "invalid_client",
        "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
        status=401,
    )


def certificate_not_registered(thumbprint: str | None, app_id: str, object_id: str) -> AadError:
    used = f"Thumbprint of key used by client: '{thumbprint}', " if thumbprint else ""
    return AadError(
        700027,
        "invalid_client",
        "The certificate with identifier used to sign the client assertion is not registered "
        f"on application. [Reason - The key was not found., {used}Please visit the Azure "
        "Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id "
        f"'{app_id}'. Review the documentation at https://docs.microsoft.com/en-us/graph/"
        "deployments to determine the corresponding service endpoint and https://docs."
        "microsoft.com/en-us/graph/api/application-get?view=graph-rest-1.0&tabs=http to build "
        "a query request URL, such as "
        f"'https://graph.microsoft.com/beta/applications/{object_id}'].",
        status=401,
    )


def assertion_invalid_signature(thumbprint: str, start: str, end: str) -> AadError:
    return AadError(
        700027,
        "invalid_client",
        "Client assertion contains an invalid signature. [Reason - The provided signature value "
        f"did not match the expected signature value., Thumbprint of key used by client: "
        f"'{thumbprint}', Found key 'Start={start}, End={end}']",
        status=401,
    )


def assertion_key_expired(thumbprint: str, start: str, end: str) -> AadError:
    return AadError(
        700027,
        "invalid_client",
        "Client assertion contains an invalid signature. [Reason - The key used is expired., "
        f"Thumbprint of key used by client: '{thumbprint}', Found key 'Start={start}, "
        f"End={end}']",
        status=401,
    )


def assertion_malformed(reason: str) -> AadError:
    return AadError(
        50027,
        "invalid_request",
        f"JWT token is invalid or malformed. [Reason - {reason}]",
    )


def assertion_time_range(now: str, valid_from: str, expires: str) -> AadError:
    return AadError(
        700024,
        "invalid_client",
        f"Client assertion is not within its valid time range. Current time: {now}, assertion "
        f"valid from {valid_from}, expiry time of assertion {expires}. {_CERT_DOCS}",
        status=401,
    )


def assertion_audience() -> AadError:
    return AadError(
        700023,
        "invalid_client",
        f"Client assertion audience claim does not match Realm issuer. {_CERT_DOCS}",
        status=401,
    )


def assertion_subject() -> AadError:
    return AadError(
        700021,
        "invalid_client",
        f"Client assertion application identifier doesn't match 'client_id' parameter. "
        f"{_CERT_DOCS}",
        status=401,
    )


# -------------------------------------------------------------------- scopes


def scope_missing() -> AadError:
    return AadError(
        70011, "invalid_scope", "The provided request must include a 'scope' input parameter."
    )


def scope_invalid(scope: str) -> AadError:
    return AadError(
        70011,
        "invalid_scope",
        f"The provided value for the input parameter 'scope' is not valid. The scope '{scope}' "
        "is not valid.",
    )


def scope_does_not_exist(scope: str) -> AadError:
    return AadError(
        70011,
        "invalid_scope",
        f"The provided value for the input parameter 'scope' is not valid. The scope '{scope}' "
        "does not exist.",
    )


def scopes_not_compatible(scope: str) -> AadError:
    return AadError(
        70011,
        "invalid_scope",
        "The provided value for the input parameter 'scope' is not valid. One or more scopes in "
        f"'{scope}' are not compatible with each other.",
    )


def scope_more_than_one_resource(scope: str) -> AadError:
    return AadError(
        28000,
        "invalid_scope",
        "Provided value for the input parameter scope is not valid because it contains more "
        f"than one resource. Scope {scope} is not valid.",
    )


def client_credentials_scope(scope: str) -> AadError:
    return AadError(
        1002012,
        "invalid_scope",
        f"The provided value for scope {scope} is not valid. Client credential flows must have "
        "a scope value with /.default suffixed to the resource identifier (application ID URI).",
    )


def resource_not_found(resource: str, tenant: str) -> AadError:
    return AadError(
        500011,
        "invalid_resource",
        f"The resource principal named {resource} was not found in the tenant named {tenant}. "
        "This can happen if the application has not been installed by the administrator of "
        "the tenant or consented to by any user in the tenant. You might have sent your "
        "authentication request to the wrong tenant.",
    )


def consent_required(app_id: str, app_name: str, *, error: str = "invalid_grant") -> AadError:
    return AadError(
        65001,
        error,
        f"The user or administrator has not consented to use the application with ID "
        f"'{app_id}' named '{app_name}'. Send an interactive authorization request for this "
        "user and resource.",
        suberror="consent_required",
    )


# ------------------------------------------------------------------- the user


def user_not_found(tenant: str) -> AadError:
    return AadError(
        50034,
        "invalid_grant",
        f"The user account {{EUII Hidden}} does not exist in the {tenant} directory. To sign "
        "into this application, the account must be added to the directory.",
    )


def user_disabled() -> AadError:
    return AadError(50057, "invalid_grant", "The user account is disabled.")


def invalid_password() -> AadError:
    return AadError(
        50126,
        "invalid_grant",
        "Error validating credentials due to invalid username or password.",
    )


def mfa_required(resource_app_id: str) -> AadError:
    return AadError(
        50076,
        "invalid_grant",
        "Due to a configuration change made by your administrator, or because you moved to a "
        "new location, you must use multi-factor authentication to access "
        f"'{resource_app_id}'.",
        suberror="basic_action",
        claims='{"access_token":{"capolids":{"essential":true,"values":'
        '["5a1d9e2c-3b4f-4c6d-8e7f-9a0b1c2d3e4f"]}}}',
    )


def blocked_by_conditional_access() -> AadError:
    return AadError(
        53003,
        "invalid_grant",
        "Access has been blocked by Conditional Access policies. The access policy does not "
        "allow token issuance.",
        suberror="message_only",
    )


def silent_sign_in_without_session() -> AadError:
    return AadError(
        50058,
        "login_required",
        "A silent sign-in request was sent but no user is signed in.",
    )


# -------------------------------------------------------------------- grants


def grant_expired() -> AadError:
    return AadError(
        70008,
        "invalid_grant",
        "The provided authorization code or refresh token has expired due to inactivity. Send "
        "a new interactive authorization request for this user and resource.",
        suberror="bad_token",
    )


def grant_revoked(issued: str, valid_from: str) -> AadError:
    return AadError(
        50173,
        "invalid_grant",
        "The provided grant has expired due to it being revoked, a fresh auth token is needed. "
        "The user might have changed or reset their password. The grant was issued on "
        f"'{issued}' and the TokensValidFrom date (before which tokens are not valid) for this "
        f"user is '{valid_from}'.",
        suberror="bad_token",
    )


def code_redeemed() -> AadError:
    return AadError(
        54005,
        "invalid_grant",
        "OAuth2 Authorization code was already redeemed, please retry with a new valid code or "
        "use an existing refresh token.",
    )


def redirect_uri_changed(given: str, original: str) -> AadError:
    return AadError(
        500112,
        "invalid_grant",
        f"The reply address '{given}' does not match the reply address '{original}' provided "
        "when requesting Authorization code.",
    )


def pkce_mismatch() -> AadError:
    return AadError(
        501481,
        "invalid_grant",
        "The Code_Verifier does not match the code_challenge supplied in the authorization "
        "request.",
    )


def pkce_method_invalid() -> AadError:
    return AadError(50149, "invalid_request", "Invalid Code_Challenge_method parameter.")


def pkce_challenge_size() -> AadError:
    return AadError(501491, "invalid_request", "Invalid size of Code_Challenge parameter.")


def redirect_uri_mismatch(uri: str, app_id: str) -> AadError:
    return AadError(
        50011,
        "invalid_request",
        f"The redirect URI '{uri}' specified in the request does not match the redirect URIs "
        f"configured for the application '{app_id}'. Make sure the redirect URI sent in the "
        "request matches one added to your application in the Azure portal. Navigate to "
        "https://aka.ms/redirectUriMismatchError to learn more about how to fix this.",
    )


def no_redirect_uri(app_id: str) -> AadError:
    return AadError(
        500113,
        "invalid_request",
        f"No reply address is registered for the application '{app_id}'.",
    )


def response_type_not_enabled(response_type: str) -> AadError:
    return AadError(
        700054,
        "unsupported_response_type",
        f"response_type '{response_type}' is not enabled for the application.",
    )


# -------------------------------------------------------------- device code


def authorization_pending() -> AadError:
    return AadError(
        70016,
        "authorization_pending",
        "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
    )


def authorization_declined() -> AadError:
    return AadError(65004, "authorization_declined", "User declined to consent to access the app.")


def device_code_expired() -> AadError:
    return AadError(
        70020,
        "expired_token",
        "The provided value for the input parameter 'device_code' is not valid. This device code "
        "has expired.",
    )


def bad_verification_code() -> AadError:
    return AadError(
        70018,
        "bad_verification_code",
        "Invalid verification code due to User typing in wrong user code for device code flow. "
        "Authorization isn't approved.",
    )
