"""Errors cross the trigger boundary and the shared IDLE hub with their class, message and fields."""

from __future__ import annotations

import json

import pytest

from airflow_provider_o365mail import exceptions
from airflow_provider_o365mail.exceptions import (
    ConsentRevoked,
    MailServerError,
    O365MailError,
    ProxyRefused,
    RecipientsRefusedError,
)
from airflow_provider_o365mail.triggers.imap import error_event, raise_from_event

SAMPLES: dict[str, object] = {
    "proxy": "http://127.0.0.1:3128",
    "status": 403,
    "conn_id": "o365mail_default",
    "error": "invalid_grant",
    "error_codes": [65001],
    "correlation_id": "c0ffee",
    "refused": {"a@contoso.com": (550, "5.1.1 unknown")},
    "code": "ErrorAccessDenied",
    "reply": "535 5.7.139 Authentication unsuccessful",
}


def _every_error_class() -> list[type[O365MailError]]:
    found, pending = [], [O365MailError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def _instance(cls: type[O365MailError]) -> O365MailError:
    fields = {name: SAMPLES[name] for name in cls.payload_fields}
    return cls(f"{cls.__name__} happened; do this.", **fields)


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__name__)
def test_every_error_round_trips_through_json(cls):
    original = _instance(cls)
    payload = json.loads(json.dumps(original.to_payload()))
    rebuilt = exceptions.from_payload(payload)
    assert type(rebuilt) is cls
    assert str(rebuilt) == str(original)
    for name in cls.payload_fields:
        assert getattr(rebuilt, name) == getattr(original, name), name


def test_proxy_refused_survives_the_trigger_event_and_stays_fail_fast():
    err = ProxyRefused(
        "proxy http://127.0.0.1:3128 refused CONNECT imap:993: 403", proxy="http://127.0.0.1:3128", status=403
    )
    event = json.loads(json.dumps(error_event(err).payload))
    with pytest.raises(ProxyRefused) as caught:
        raise_from_event(event)
    assert caught.value.status == 403 and caught.value.proxy == "http://127.0.0.1:3128"
    assert "403" in str(caught.value)


def test_a_fresh_copy_per_waiter_keeps_class_and_fields():
    err = ConsentRevoked(
        "consent removed; run airflow o365mail authorize", conn_id="c", error="invalid_grant", error_codes=[65001]
    )
    copy = exceptions.fresh_copy(err)
    assert copy is not err and type(copy) is ConsentRevoked
    assert copy.error_codes == [65001] and copy.conn_id == "c"
    proxy = exceptions.fresh_copy(ProxyRefused("refused", proxy="http://p:1", status=407))
    assert isinstance(proxy, ProxyRefused) and proxy.status == 407


def test_recipients_refused_keeps_the_refusals():
    err = RecipientsRefusedError("refused", {"a@b": (550, "no")})
    rebuilt = exceptions.from_payload(json.loads(json.dumps(err.to_payload())))
    assert rebuilt.refused == {"a@b": (550, "no")}


def test_events_of_an_older_triggerer_and_unknown_classes_still_raise_a_provider_error():
    with pytest.raises(ConsentRevoked, match="run authorize"):
        raise_from_event({"status": "error", "error_class": "ConsentRevoked", "message": "run authorize"})
    with pytest.raises(MailServerError, match="something new"):
        raise_from_event({"status": "error", "error_class": "FromTheFuture", "message": "something new"})
    with pytest.raises(MailServerError):
        raise_from_event({"status": "error", "error_class": "ValueError", "message": "not ours"})


def test_a_foreign_exception_becomes_a_mail_server_error_event():
    event = error_event(TimeoutError("read timed out")).payload
    with pytest.raises(MailServerError, match="TimeoutError: read timed out"):
        raise_from_event(event)


@pytest.mark.parametrize(
    "fields",
    [
        {"refused": "not a mapping"},
        {"refused": ["a", "b"]},
        {"__class__": "x", "__dict__": {}, "args": 1, "__traceback__": 2},
        {"status": {"nested": True}, "unexpected": 1},
    ],
)
def test_odd_payloads_never_raise_anything_but_a_provider_error(fields):
    for cls in ("RecipientsRefusedError", "ProxyRefused", "ConsentRevoked", "MailServerError"):
        err = exceptions.from_payload({"kind": exceptions.PAYLOAD_KIND, "class": cls, "message": "m", "fields": fields})
        assert isinstance(err, O365MailError) and str(err) == "m"
        assert type(err).__name__ == cls


def test_only_the_providers_own_classes_are_rebuilt_by_name():
    class FromAPlugin(O365MailError):
        pass

    err = exceptions.from_payload({"kind": exceptions.PAYLOAD_KIND, "class": "FromAPlugin", "message": "m"})
    assert type(err) is MailServerError


def test_error_events_keep_the_keys_an_older_worker_reads():
    payload = error_event(ConsentRevoked("consent removed", conn_id="c")).payload
    assert payload["error_class"] == "ConsentRevoked" and payload["message"] == "consent removed"


def test_a_refused_token_is_refreshed_once_even_after_a_forced_refresh():
    from airflow_provider_o365mail.core.credentials import login_with_fresh_token
    from airflow_provider_o365mail.exceptions import MailAuthenticationError

    calls = []

    def login(force):
        calls.append(force)
        if len(calls) == 1:
            raise MailAuthenticationError("refused")
        return "session"

    assert login_with_fresh_token(login, what="SMTP", user="u", force_refresh=True) == "session"
    assert calls == [True, True]
    calls.clear()
    assert login_with_fresh_token(login, what="IMAP", user="u") == "session"
    assert calls == [False, True]
