"""Register secrets with Airflow's log maskers, in every form the provider puts them on the wire (no I/O).

Airflow keeps two maskers: the Task SDK's (task and supervisor logs, forwarded to the supervisor)
and the core one (api-server, scheduler, CLI, the api-server's access log). Both get every value.
A token also travels URL-encoded (form bodies) and inside a base64 XOAUTH2 string, so those forms
are registered too.

Bounded cost. Airflow's masker recompiles one alternation of every secret it holds on each new
one, and never forgets any: a triggerer or api-server that refreshes tokens for months would
hold thousands of 2 kB tokens, and each new token would cost seconds of CPU (measured: 100 new
2 kB secrets took 190 s on 2 cores). So this module registers a batch of forms with one compile
per masker, and forgets its own forms once they are useless: an access token's (and its XOAUTH2
strings') after the token expires, a refresh token's an hour after it was last seen (a rotated
one is never used or logged again by the provider). The client secret and the consent flow's
values stay for the life of the process. Where a masker does not have the expected shape (another
Airflow version), the public ``add_mask`` is used, without forgetting.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import math
import os
import re
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

import msal

#: Where HTTP clients find a proxy URL (which may carry credentials).
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
#: How long a refresh token's forms stay registered after it was last seen (it rotates on use).
REFRESH_TOKEN_RETENTION = 3600.0
#: An access token's forms are forgotten this long after it expires.
EXPIRED_TOKEN_GRACE = 300.0
#: When the expiry of an ID token or a token without ``expires_on`` is unknown.
UNKNOWN_EXPIRY_RETENTION = 2 * 3600.0

_MASKER_MODULES = ("airflow.sdk._shared.secrets_masker", "airflow._shared.secrets_masker")
_lock = threading.Lock()
#: form -> POSIX time after which this module forgets it (math.inf: never).
_registered: dict[str, float] = {}


def _maskers() -> list[Any]:
    found: dict[int, Any] = {}
    for name in _MASKER_MODULES:
        with contextlib.suppress(Exception):
            masker = importlib.import_module(name)._secrets_masker()
            found[id(masker)] = masker
    return list(found.values())


def _patterns_of(masker: Any, form: str) -> list[str]:
    """The escaped patterns Airflow's ``add_mask`` would add for ``form``."""
    skip = getattr(importlib.import_module(type(masker).__module__), "SECRETS_TO_SKIP_MASKING", set())
    adaptations = masker._adaptations(form)
    return [re.escape(s) for s in adaptations if s and len(s) >= masker.min_length_to_mask and s.lower() not in skip]


def _fast_path(masker: Any) -> bool:
    return isinstance(getattr(masker, "patterns", None), set) and hasattr(masker, "_adaptations")


#: id(masker) -> the patterns this module added to it (never Airflow's own: those it does not remove).
_added: dict[int, set[str]] = {}


def _update(masker: Any, add: list[str], forget: list[str]) -> None:
    if not _fast_path(masker):
        for form in add:
            masker.add_mask(form)
        return
    ours = _added.setdefault(id(masker), set())
    removable = {p for form in forget for p in _patterns_of(masker, form)} & ours
    adding = {p for form in add for p in _patterns_of(masker, form)}
    kept = {p for form in _registered for p in _patterns_of(masker, form)} if removable else set()
    removable -= kept | adding  # a pattern another live form of ours still needs stays
    new = adding - masker.patterns
    if not removable and not new:
        return
    ours -= removable
    ours |= new
    masker.patterns.difference_update(removable)
    masker.patterns.update(new)
    # Airflow's add_mask (other threads) adds to the same set and compiles without a lock: publish a
    # compiled pattern only if the set did not change while it compiled, so no one's secret is lost.
    for _ in range(10):
        snapshot = frozenset(masker.patterns)
        compiled = re.compile("|".join(snapshot)) if snapshot else None
        if frozenset(masker.patterns) == snapshot:
            masker.replacer = compiled
            return
    masker.replacer = re.compile("|".join(set(masker.patterns)))


def _long_lived_supervisor(comms: Any) -> bool:
    """The triggerer's main process outlives every trigger: its masker (Airflow's) never forgets."""
    return type(comms).__name__ == "TriggerCommsDecoder"


def _tell_supervisor(forms: list[str], lifetime: bool) -> None:
    """The supervisor writes the task's log: it masks the new forms too.

    A task's supervisor lives as long as the task and gets every form. The triggerer's main process
    lives for months and Airflow's masker there cannot forget, so it gets only the secrets that stay
    for the life of the process (client secret, seed refresh token); the rotating tokens are masked
    and forgotten in the trigger process itself.
    """
    with contextlib.suppress(Exception):
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.comms import MaskSecret

        comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
        if comms is None or (not lifetime and _long_lived_supervisor(comms)):
            return
        for form in forms:
            comms.send(MaskSecret(value=form, name=None))


def _register(forms: Iterable[str], until: float) -> None:
    """Register ``forms`` (kept until POSIX time ``until``) with one compile per masker."""
    with _lock:
        now = time.time()
        forget = [form for form, expiry in _registered.items() if expiry <= now]
        for form in forget:
            del _registered[form]
        add = []
        for form in dict.fromkeys(f for f in forms if f):
            if form not in _registered:
                add.append(form)
            _registered[form] = max(_registered.get(form, 0.0), until)
        forget = [form for form in forget if form not in _registered]
        if not add and not forget:
            return
        for masker in _maskers():
            with contextlib.suppress(Exception):  # masking must never break the caller
                _update(masker, add, forget)
    _tell_supervisor(add, lifetime=until == math.inf)


def reset_all() -> None:
    """Empty both of Airflow's maskers and this module's registry (test sessions only: one long pytest
    process creates thousands of secrets, and Airflow also masks every connection's sensitive extras)."""
    with _lock:
        for masker in _maskers():
            with contextlib.suppress(Exception):
                masker.reset_masker()
        _registered.clear()
        _added.clear()


def registered_forms() -> int:
    """How many forms this module holds registered (for tests and diagnostics)."""
    with _lock:
        return len(_registered)


def secret_forms(value: str) -> set[str]:
    """``value`` as it is, URL-encoded (both styles) and base64-encoded."""
    return {value, quote(value, safe=""), quote_plus(value), base64.b64encode(value.encode()).decode()}


def _xoauth2_forms(user: str, access_token: str) -> list[str]:
    sasl = f"user={user}\x01auth=Bearer {access_token}\x01\x01"
    return [sasl, base64.b64encode(sasl.encode()).decode()]


def mask(*values: str | None) -> None:
    """Register each secret and its encoded forms for the life of the process (client secret, code)."""
    _register([form for value in values if value for form in secret_forms(value)], math.inf)


def mask_refresh_token(value: str | None) -> None:
    """A refresh token: kept while it is seen, forgotten an hour after it was last seen."""
    if value:
        _register(secret_forms(value), time.time() + REFRESH_TOKEN_RETENTION)


def mask_access_token(value: str, expires_on: float | None, user: str | None = None) -> None:
    """An access token (and its XOAUTH2 strings for ``user``), forgotten once it has expired."""
    until = (expires_on + EXPIRED_TOKEN_GRACE) if expires_on else time.time() + UNKNOWN_EXPIRY_RETENTION
    forms = [*secret_forms(value), *(_xoauth2_forms(user, value) if user else ())]
    _register(forms, until)


def mask_pem(pem: str) -> None:
    """A PEM private key, for the life of the process: as it is, and its base64 body on one line.

    The key never goes on the wire (MSAL signs with it locally), so no encoded forms.
    """
    body = "".join(line.strip() for line in pem.splitlines() if line.strip() and not line.startswith("-----"))
    _register([pem.strip(), body], math.inf)


def mask_assertion(assertion: str | None) -> None:
    """A client assertion or a federated token (a JWT, URL-safe already: one form).

    Like a refresh token it is kept while it is seen and forgotten an hour after: a certificate's
    assertion lives ten minutes, a federated token file is read anew on every request.
    """
    if assertion:
        _register([assertion], time.time() + REFRESH_TOKEN_RETENTION)


def mask_xoauth2(user: str, access_token: str, expires_on: float | None = None) -> None:
    """The SASL XOAUTH2 string for ``user`` and its base64 form (what goes over IMAP/SMTP)."""
    until = (expires_on + EXPIRED_TOKEN_GRACE) if expires_on else time.time() + UNKNOWN_EXPIRY_RETENTION
    _register(_xoauth2_forms(user, access_token), until)


def mask_cache(cache: msal.SerializableTokenCache) -> None:
    """Every refresh, access and ID token in an MSAL cache (e.g. one just read from the store)."""
    for item in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN):
        mask_refresh_token(item.get("secret"))
    for item in cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN):
        if item.get("secret"):
            expires_on = item.get("expires_on")
            mask_access_token(item["secret"], float(expires_on) if expires_on else None)
    for item in cache.search(msal.TokenCache.CredentialType.ID_TOKEN):
        if item.get("secret"):
            _register(secret_forms(item["secret"]), time.time() + UNKNOWN_EXPIRY_RETENTION)


def mask_result(result: dict) -> None:
    """The tokens of an MSAL result dict."""
    if result.get("access_token"):
        expires_in = result.get("expires_in")
        expires_on = time.time() + float(expires_in) if expires_in else None
        mask_access_token(result["access_token"], expires_on)
    mask_refresh_token(result.get("refresh_token"))
    if result.get("id_token"):
        _register(secret_forms(result["id_token"]), time.time() + UNKNOWN_EXPIRY_RETENTION)


def mask_proxies(configured: str | None = None) -> None:
    """The credentials of the connection's proxy URL and of the proxy variables of the environment.

    The password, ``user:password`` (and so its base64, the ``Proxy-Authorization: Basic`` value) and
    the whole URL as written. Any scheme: an ``https://`` proxy in ``HTTPS_PROXY`` is masked too.
    """
    for raw in (configured, *(os.environ.get(name) for name in PROXY_VARIABLES)):
        if not raw:
            continue
        parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        if parts.password:
            user, password = unquote(parts.username or ""), unquote(parts.password)
            mask(raw, password, parts.password, f"{user}:{password}")
