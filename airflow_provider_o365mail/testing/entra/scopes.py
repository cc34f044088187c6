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


def parse(scope: str | None) -> ScopeRequest:
    """Split a scope string; more than one resource is AADSTS28000, as at Microsoft."""
    oidc: set[str] = set()
    resources: set[str] = set()
    permissions: set[str] = set()
    default = False
    for item in (scope or "").split():
        if item.lower() in OIDC_SCOPES:
            oidc.add(item.lower())
            continue
        if item.startswith(("https://", "api://")) and "/" in item[8:]:
            resource, _, perm = item.rpartition("/")
        else:
            resource, perm = GRAPH, item
        resources.add(resource)
        if perm == ".default":
            default = True
        else:
            permissions.add(perm)
    if len({canonical_resource(r) for r in resources}) > 1:
        raise errors.multiple_resources()
    resource = next(iter(resources)) if resources else None
    return ScopeRequest(frozenset(oidc), resource, frozenset(permissions), default)
