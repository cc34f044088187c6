"""Cached access tokens are found whether Entra named their scopes in full or by short name."""

from __future__ import annotations

import dataclasses
import time

import msal
import pytest

from airflow_provider_o365mail.auth.tokens import TokenManager
from airflow_provider_o365mail.connection import settings_from_fields

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def settings(**extra):
    fields = {"tenant_id": TENANT, "mailbox": "reports@contoso.com", "refresh_token": "rt-secret", **extra}
    return settings_from_fields("o365mail_scopes", CLIENT, "client-secret", fields)


def cache_with(granted: list[str], token: str) -> msal.SerializableTokenCache:
    """A cache holding one access token as MSAL stores Entra's answer (``scope``: what Entra granted)."""
    cache = msal.SerializableTokenCache()
    cache.add(
        {
            "client_id": CLIENT,
            "scope": granted,
            "token_endpoint": f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token",
            "response": {"access_token": token, "expires_in": 3600, "token_type": "Bearer", "scope": " ".join(granted)},
            "params": {},
            "data": {},
        },
        now=time.time(),
    )
    return cache


def manager(s) -> TokenManager:
    return TokenManager(s, store=object())  # the cache is given; the store is never read


@pytest.mark.parametrize(
    "granted",
    [
        ["Mail.ReadWrite", "Mail.Send"],  # Entra's answer for Graph, its default resource
        ["https://graph.microsoft.com/Mail.ReadWrite", "https://graph.microsoft.com/Mail.Send"],
    ],
)
def test_a_cached_graph_token_is_found_however_its_scopes_were_named(granted):
    s = settings()
    graph_manager = manager(dataclasses.replace(s, scopes=s.graph_scopes))
    found = graph_manager._cached_access_token(cache_with(granted, "graph-token"))
    assert found is not None and found.token == "graph-token"


def test_tokens_of_one_resource_never_answer_for_the_other():
    s = settings()
    exchange_manager = manager(s)
    graph_manager = manager(dataclasses.replace(s, scopes=s.graph_scopes))
    graph_cache = cache_with(["Mail.ReadWrite", "Mail.Send"], "graph-token")
    exchange_cache = cache_with(list(s.scopes), "exchange-token")
    assert exchange_manager._cached_access_token(graph_cache) is None
    assert graph_manager._cached_access_token(exchange_cache) is None
    assert exchange_manager._cached_access_token(exchange_cache).token == "exchange-token"
    partial = cache_with(["Mail.Send"], "send-only")  # fewer permissions than the connection asks for
    assert graph_manager._cached_access_token(partial) is None
