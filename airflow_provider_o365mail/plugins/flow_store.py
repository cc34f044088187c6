"""In-flight consent flows, kept where every api-server replica finds them: the metadata DB.

A flow (MSAL's dict with state, nonce and the PKCE verifier) is encrypted with the token-store
key and stored in a Variable named after a hash of its state. It expires after 10 minutes, is
bound to the Airflow user who started it (checked with :func:`peek_flow` before the flow is
used up) and can be consumed once: the row is deleted, and only
the request whose DELETE removed it may use it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_o365mail.auth import crypto
from airflow_provider_o365mail.exceptions import InvalidRequestError

FLOW_PREFIX = "o365mail_consent_flow__"
FLOW_TTL_SECONDS = 600


@dataclass(frozen=True)
class PendingFlow:
    conn_id: str
    user_id: str
    redirect_uri: str
    created_at: float
    flow: dict[str, Any] = field(repr=False)


def _key(state: str) -> str:
    return FLOW_PREFIX + hashlib.sha256(state.encode()).hexdigest()[:40]


def save_flow(pending: PendingFlow, *, session: Any) -> None:
    from airflow.models.variable import Variable

    _sweep_expired(session)
    payload = json.dumps(pending.__dict__).encode()
    session.add(
        Variable(
            key=_key(pending.flow["state"]),
            val=crypto.encrypt(crypto.load_cipher(), payload),
            description="airflow-provider-o365mail: consent in progress (encrypted, single use, expires in 10 min)",
        )
    )
    session.flush()


def _decode(state: str, encrypted: str) -> PendingFlow:
    try:
        data = json.loads(crypto.decrypt(crypto.load_cipher(), encrypted, "consent flow"))
    except Exception:
        raise InvalidRequestError(_REFUSED.format(reason="the stored sign-in cannot be read")) from None
    pending = PendingFlow(**data)
    if pending.flow.get("state") != state:
        raise InvalidRequestError(_REFUSED.format(reason="the state does not match"))
    if time.time() - pending.created_at > FLOW_TTL_SECONDS:
        raise InvalidRequestError(_REFUSED.format(reason="the sign-in took longer than 10 minutes"))
    return pending


def _checked_key(state: str) -> str:
    if not state or len(state) > 512:
        raise InvalidRequestError(_REFUSED.format(reason="the response carries no valid state"))
    return _key(state)


def peek_flow(state: str, *, session: Any) -> PendingFlow:
    """The flow for ``state`` without using it up (to check who may finish it first)."""
    from airflow.models.variable import Variable

    row = session.query(Variable).filter(Variable.key == _checked_key(state)).one_or_none()
    if row is None:
        raise InvalidRequestError(_REFUSED.format(reason="this sign-in is unknown or was already used"))
    return _decode(state, row.val)


def consume_flow(state: str, *, session: Any) -> PendingFlow:
    """Return and delete the flow for ``state``; refuse unknown, used, expired or tampered states."""
    from airflow.models.variable import Variable

    key = _checked_key(state)
    row = session.query(Variable).filter(Variable.key == key).one_or_none()
    if row is None:
        raise InvalidRequestError(_REFUSED.format(reason="this sign-in is unknown or was already used"))
    encrypted = row.val
    deleted = session.query(Variable).filter(Variable.key == key).delete(synchronize_session=False)
    session.flush()
    if deleted != 1:
        raise InvalidRequestError(_REFUSED.format(reason="this sign-in was already used"))
    return _decode(state, encrypted)


def _sweep_expired(session: Any) -> None:
    from airflow.models.variable import Variable

    cipher = crypto.load_cipher()
    for row in session.query(Variable).filter(Variable.key.like(f"{FLOW_PREFIX}%")).all():
        try:
            created = json.loads(crypto.decrypt(cipher, row.val, "consent flow"))["created_at"]
        except Exception:
            created = 0
        if time.time() - created > FLOW_TTL_SECONDS:
            session.delete(row)


_REFUSED = "Consent refused: {reason}. Start again with the Authorize button (each link works once, for 10 minutes)."
