"""Resources (APIs) of the tenant, permissions and the ``scope`` parameter, as Entra ID reads them.

A scope is ``{resource identifier}/{permission}`` (``https://outlook.office.com/SMTP.Send``),
``{resource}/.default``, an OIDC scope (``openid profile offline_access email``), or a bare
permission name, which Entra ID takes as Microsoft Graph's (``Mail.Send``): asking for a bare
``SMTP.Send`` is the classic mistake, answered with AADSTS70011.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from . import aadsts
from .tokens import EXCHANGE_APP_ID

__all__ = [
    "EXCHANGE",
    "GRAPH",
    "GRAPH_APP_ID",
    "RESERVED_SCOPES",
    "Resource",
    "ScopeItem",
    "Scopes",
    "granted",
    "parse_scopes",
    "permission_of",
    "resource_for",
]

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
_PERMISSION = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
_EXCHANGE_ONLY = ("smtp.", "imap.", "pop.", "ews.", "eas.", "full_access_as_app")


@dataclass(frozen=True, slots=True)
class Resource:
    """A resource (API) of the tenant, known by its identifier URIs and app id."""

    name: str
    app_id: str
    uri: str
    identifiers: frozenset[str]


EXCHANGE = Resource(
    "Office 365 Exchange Online",
    EXCHANGE_APP_ID,
    "https://outlook.office.com",
    frozenset({"https://outlook.office.com", "https://outlook.office365.com", EXCHANGE_APP_ID}),
)
GRAPH = Resource(
    "Microsoft Graph",
    GRAPH_APP_ID,
    "https://graph.microsoft.com",
    frozenset({"https://graph.microsoft.com", GRAPH_APP_ID}),
)
RESOURCES: tuple[Resource, ...] = (EXCHANGE, GRAPH)


def resource_for(identifier: str) -> Resource | None:
    key = identifier.rstrip("/").lower()
    for resource in RESOURCES:
        if key in resource.identifiers:
            return resource
    return None


def _exchange_only(name: str) -> bool:
    return name.lower().startswith(_EXCHANGE_ONLY)


def permission_of(entry: str) -> tuple[Resource, str] | None:
    """A permission of the settings (short or qualified) → (resource, name)."""
    if "/" in entry:
        ident, _, name = entry.rpartition("/")
        resource = resource_for(ident)
        return (resource, name) if resource is not None and name else None
    return (EXCHANGE if _exchange_only(entry) else GRAPH), entry


def granted(entries: Iterable[str], resource: Resource) -> list[str]:
    """Names of the permissions in ``entries`` that belong to ``resource``, de-duplicated."""
    names: list[str] = []
    for entry in entries:
        found = permission_of(entry)
        if (
            found is not None
            and found[0] is resource
            and found[1].lower() not in {n.lower() for n in names}
        ):
            names.append(found[1])
    return names


# ------------------------------------------------------------------- scopes


@dataclass(frozen=True, slots=True)
class ScopeItem:
    resource: Resource
    identifier: str | None
    """As requested, without trailing slash; ``None`` for an unqualified (Graph) name."""
    name: str


@dataclass(frozen=True, slots=True)
class Scopes:
    text: str
    reserved: frozenset[str]
    items: tuple[ScopeItem, ...]

    def resources(self) -> list[Resource]:
        found: list[Resource] = []
        for item in self.items:
            if item.resource not in found:
                found.append(item.resource)
        return found

    def single_resource(self) -> Resource | None:
        resources = self.resources()
        if len(resources) > 1:
            raise aadsts.scope_more_than_one_resource(self.text)
        return resources[0] if resources else None


def parse_scopes(text: str | None, tenant: str) -> Scopes:
    words = (text or "").split()
    if not words:
        raise aadsts.scope_missing()
    joined = " ".join(words)
    reserved: set[str] = set()
    items: list[ScopeItem] = []
    for word in words:
        if word.lower() in RESERVED_SCOPES:
            reserved.add(word.lower())
            continue
        identifier: str | None
        if "/" in word:
            ident, _, name = word.rpartition("/")
            found = resource_for(ident)
            if found is None:
                raise aadsts.resource_not_found(ident.rstrip("/"), tenant)
            resource, identifier = found, ident.rstrip("/")
        else:
            resource, identifier, name = GRAPH, None, word
        if name != ".default" and not _PERMISSION.match(name):
            raise aadsts.scope_invalid(joined)
        if resource is GRAPH and _exchange_only(name):
            raise aadsts.scope_does_not_exist(word)
        items.append(ScopeItem(resource, identifier, name))
    for resource in {item.resource for item in items}:
        mine = [item for item in items if item.resource is resource]
        if len(mine) > 1 and any(item.name == ".default" for item in mine):
            raise aadsts.scopes_not_compatible(joined)
    return Scopes(joined, frozenset(reserved), tuple(items))
