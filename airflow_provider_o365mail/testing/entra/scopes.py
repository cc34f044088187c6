"""Scope strings as the Microsoft identity platform v2 reads them (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from airflow_provider_o365mail.testing.entra import errors

OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
GRAPH = "https://graph.microsoft.com"
EXCHANGE = "https://outlook.office.com"
#: Exchange Online answers to both application ID URIs (same service principal, 00000002-0000-0ff1-ce00-...).
EXCHANGE_ALIASES = frozenset({"https://outlook.office.com", "https://outlook.office365.com", "https://ps.outlook.com"})


@dataclass(frozen=True)
class ScopeRequest:
    """A parsed ``scope`` parameter: the OIDC scopes and the permissions on exactly one resource."""

    oidc: frozenset[str]
    resource: str | None
    permissions: frozenset[str]
    default: bool

    @property
    def wants_refresh_token(self) -> bool:
        return "offline_access" in self.oidc

    def qualified(self, permissions: frozenset[str] | set[str] | None = None) -> list[str]:
        perms = self.permissions if permissions is None else permissions
        if self.resource is None:
            return []
        if self.resource == GRAPH:
            return sorted(perms)
        return sorted(f"{self.resource}/{p}" for p in perms)


def canonical_resource(resource: str) -> str:
    return EXCHANGE if resource in EXCHANGE_ALIASES else resource


def _split(item: str) -> tuple[str, str]:
    """``https://host/Perm`` -> (``https://host``, ``Perm``); an unprefixed scope is Microsoft Graph's."""
    if item.startswith(("https://", "api://")) and "/" in item[8:]:
        resource, _, perm = item.rpartition("/")
        return resource, perm
    return GRAPH, item


def parse(scope: str | None) -> ScopeRequest:
    """Split a scope string; more than one resource is AADSTS28000, as at Microsoft's token endpoint."""
    requests = parse_per_resource(scope)
    if len(requests) > 1:
        raise errors.multiple_resources()
    return requests[0]


def parse_per_resource(scope: str | None) -> list[ScopeRequest]:
    """One request per resource, each with the OIDC scopes: what ``/authorize`` accepts.

    At ``/authorize`` "the scopes can cover multiple resources" to get consent for several web APIs
    at once (v2 auth code flow docs); only the token endpoint needs a single resource. Never empty:
    OIDC scopes alone give one request without a resource.
    """
    oidc: set[str] = set()
    per_resource: dict[str, tuple[str, set[str], list[bool]]] = {}
    for item in (scope or "").split():
        if item.lower() in OIDC_SCOPES:
            oidc.add(item.lower())
            continue
        resource, perm = _split(item)
        _, permissions, default = per_resource.setdefault(canonical_resource(resource), (resource, set(), [False]))
        if perm == ".default":
            default[0] = True
        else:
            permissions.add(perm)
    if not per_resource:
        return [ScopeRequest(frozenset(oidc), None, frozenset(), False)]
    return [
        ScopeRequest(frozenset(oidc), spelling, frozenset(permissions), default[0])
        for spelling, permissions, default in per_resource.values()
    ]
