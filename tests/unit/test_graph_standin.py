"""The Graph stand-in's pure rules: tokens, messages, upload ranges, limits, faults, settings, scopes."""

from __future__ import annotations

import base64
import email
import time
from email import policy
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from airflow_provider_o365mail.testing.entra import scopes
from airflow_provider_o365mail.testing.entra.errors import AadstsError
from airflow_provider_o365mail.testing.graph import errors, messages
from airflow_provider_o365mail.testing.graph.errors import GraphError
from airflow_provider_o365mail.testing.graph.faults import Fault, FaultQueue
from airflow_provider_o365mail.testing.graph.limits import Limits, LimitSettings
from airflow_provider_o365mail.testing.graph.settings import GraphSettings
from airflow_provider_o365mail.testing.graph.tokens import GRAPH_APP_ID, TokenVerifier
from airflow_provider_o365mail.testing.graph.uploads import UploadSession, check_chunk, parse_content_range

TENANT = "11111111-2222-3333-4444-555555555555"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ---------------------------------------------------------------------- tokens
def token(key=KEY, **overrides) -> str:
    now = int(time.time())
    claims = {
        "aud": GRAPH_APP_ID,
        "iss": f"https://sts.windows.net/{TENANT}/",
        "tid": TENANT,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "appid": "app-1",
        "scp": "Mail.Send Mail.ReadWrite",
        "upn": "Alex@o365.sandbox.test",
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(TENANT, lambda: {"k1": KEY.public_key()}, time.time)


def code_of(call) -> tuple[int, str]:
    with pytest.raises(GraphError) as caught:
        call()
    return caught.value.status, caught.value.code


def test_delegated_and_app_only_tokens(verifier):
    caller = verifier.verify(f"Bearer {token()}")
    assert caller.delegated and caller.upn == "alex@o365.sandbox.test" and caller.has("Mail.Send")
    app = verifier.verify(f"Bearer {token(scp=None, upn=None, roles=['Mail.Send'], aud='https://graph.microsoft.com')}")
    assert not app.delegated and app.permissions == frozenset({"Mail.Send"}) and app.upn is None


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Basic abc",
        "Bearer not-a-jwt",
        f"Bearer {token(aud='https://outlook.office.com')}",
        f"Bearer {token(iss='https://sts.windows.net/other/')}",
        f"Bearer {token(exp=int(time.time()) - 301)}",
        f"Bearer {token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))}",
        f"Bearer {token(scp=None, roles=[])}",
    ],
)
def test_refused_tokens_are_401_invalid_authentication_token(verifier, header):
    assert code_of(lambda: verifier.verify(header)) == (401, "InvalidAuthenticationToken")


def test_a_token_within_the_clock_skew_is_accepted(verifier):
    assert verifier.verify(f"Bearer {token(exp=int(time.time()) - 200)}").delegated


# ---------------------------------------------------------------------- messages
def test_compose_keeps_the_message_id_and_hides_bcc_from_recipients():
    composed = messages.compose(
        {
            "subject": "hello",
            "body": {"contentType": "HTML", "content": "<b>hi</b>"},
            "toRecipients": [{"emailAddress": {"address": "b@x.test", "name": "B"}}],
            "bccRecipients": [{"emailAddress": {"address": "c@x.test"}}],
            "internetMessageId": "<fixed@x.test>",
            "internetMessageHeaders": [{"name": "X-Trace", "value": "1"}],
        },
        mailbox="a@x.test",
        mailbox_name="A",
        sender=None,
        attachments=[messages.Attachment("f.txt", "text/plain", b"data")],
        id_domain="graph.x.test",
    )
    assert composed.message_id == "<fixed@x.test>" and composed.recipients == ["b@x.test", "c@x.test"]
    sent = email.message_from_bytes(composed.for_sent_items(), policy=policy.default)
    delivered = email.message_from_bytes(composed.for_recipients(), policy=policy.default)
    assert sent["Bcc"] == "c@x.test" and "Bcc" not in delivered
    assert delivered["Message-ID"] == "<fixed@x.test>" and delivered["X-Trace"] == "1"
    assert [p.get_content() for p in delivered.iter_attachments()] == ["data"]
    assert delivered.get_body(("html",)).get_content().strip() == "<b>hi</b>"


def test_compose_generates_a_message_id_and_refuses_bad_input():
    composed = messages.compose(
        {"toRecipients": [{"emailAddress": {"address": "b@x.test"}}]},
        mailbox="a@x.test",
        mailbox_name="",
        sender=("D", "d@x.test"),
        attachments=[],
        id_domain="graph.x.test",
    )
    assert composed.message_id.endswith("@graph.x.test>") and composed.message["Sender"] == "D <d@x.test>"
    kwargs = {"mailbox": "a@x.test", "mailbox_name": "", "sender": None, "attachments": [], "id_domain": "d"}
    bad_recipient = {"toRecipients": [{"emailAddress": {"address": "bad"}}]}
    assert code_of(lambda: messages.compose(bad_recipient, **kwargs)) == (400, "ErrorInvalidRecipients")
    header = {"internetMessageHeaders": [{"name": "Subject", "value": "x"}]}
    assert code_of(lambda: messages.compose(header, **kwargs)) == (400, "InvalidInternetMessageHeader")
    empty = messages.compose({}, **kwargs)
    assert code_of(lambda: messages.check_recipients(empty)) == (400, "ErrorInvalidRecipients")


@pytest.mark.parametrize("body", [b"", b"!!!", b"bm90IGEgbWVzc2FnZQ=x", base64.b64encode(b"\x00\x01\x02")])
def test_decode_mime_refuses_what_is_not_base64_of_a_message(body):
    assert code_of(lambda: messages.decode_mime(body)) == (400, "ErrorMimeContentInvalidBase64String")


def test_decode_mime_accepts_line_broken_base64_and_from_mime_fills_the_gaps():
    raw = b"To: b@x.test\r\nBcc: c@x.test\r\nSubject: s\r\n\r\nbody\r\n"
    message = messages.decode_mime(base64.encodebytes(raw))
    composed = messages.from_mime(message, mailbox="a@x.test", mailbox_name="A", attachments=[], id_domain="d.test")
    assert composed.recipients == ["b@x.test", "c@x.test"] and composed.from_address == "a@x.test"
    assert composed.message_id.endswith("@d.test>") and b"Bcc" not in composed.for_recipients()


def test_base64_size_and_header_removal():
    assert messages.base64_size(57) == 78  # one full line: 76 characters and CRLF
    assert messages.base64_size(3 * 1024 * 1024) > 4 * 1024 * 1024
    raw = b"To: a\r\nBcc: b,\r\n c\r\nSubject: s\r\n\r\nBcc: in the body\r\n"
    assert messages.without_header(raw, "bcc") == b"To: a\r\nSubject: s\r\n\r\nBcc: in the body\r\n"


# ---------------------------------------------------------------------- upload ranges
def session(size: int = 10, received: int = 0) -> UploadSession:
    return UploadSession(
        id="s", token="t", app_id="a", mailbox="m", user_key="u", draft_id="d", name="n",
        content_type="application/octet-stream", size=size, is_inline=False, content_id=None,
        expires=0.0, path=Path("/nonexistent"), received=received,
    )  # fmt: skip


def test_content_range_parsing():
    assert parse_content_range("bytes 0-9/10") == (0, 9, 10)
    for bad in (None, "bytes 0-9", "bytes 5-4/10", "bytes 0-10/10", "items 0-1/2"):
        assert code_of(lambda bad=bad: parse_content_range(bad))[0] == 400


def test_chunks_must_come_in_order_fit_the_session_and_the_chunk_cap():
    settings = GraphSettings(upload_max_chunk=4)
    assert check_chunk(session(received=4), "bytes 4-7/10", 4, settings) == (4, 7)
    assert code_of(lambda: check_chunk(session(received=4), "bytes 0-3/10", 4, settings)) == (416, "invalidRange")
    assert code_of(lambda: check_chunk(session(), "bytes 0-4/10", 5, settings))[0] == 413
    assert code_of(lambda: check_chunk(session(), "bytes 0-3/11", 4, settings))[0] == 400
    assert code_of(lambda: check_chunk(session(), "bytes 0-3/10", 3, settings))[0] == 400
    multiple = GraphSettings(upload_max_chunk=4, upload_chunk_multiple=3, upload_out_of_order_status=400)
    assert code_of(lambda: check_chunk(session(), "bytes 0-3/10", 4, multiple))[0] == 400
    assert check_chunk(session(received=9), "bytes 9-9/10", 1, multiple) == (9, 9)  # the last may be short
    assert code_of(lambda: check_chunk(session(received=4), "bytes 0-3/10", 4, multiple))[0] == 400


# ---------------------------------------------------------------------- limits
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrency_is_per_app_and_mailbox():
    limits = Limits(LimitSettings(concurrency=2), Clock())
    leases = [limits.admit("app", "Box@x", "sendMail"), limits.admit("app", "box@x", "sendMail")]
    assert code_of(lambda: limits.admit("app", "box@x", "sendMail")) == (429, "ApplicationThrottled")
    limits.admit("other-app", "box@x", "sendMail").release()
    limits.admit("app", "other@x", "sendMail").release()
    leases[0].release()
    leases[0].release()  # idempotent
    limits.admit("app", "box@x", "sendMail").release()
    state = limits.state()["counters"]
    app_on_box, box = state["app|box@x"], state["box@x"]
    assert app_on_box["peak_concurrency"] == 2 and app_on_box["throttled"] == 1 and app_on_box["in_flight"] == 1
    assert app_on_box["requests"] == 4 and app_on_box["by_operation"] == {"sendMail": 4}
    assert box["peak_concurrency"] == 3 and box["requests"] == 5  # the mailbox's counters sum every app


def test_request_window_and_upload_budget_say_when_to_retry():
    clock = Clock()
    limits = Limits(
        LimitSettings(requests_per_window=2, request_window=60, upload_bytes_per_window=100, upload_window=30), clock
    )
    limits.admit("a", "m", "sendMail").release()
    clock.now += 10
    limits.admit("a", "m", "sendMail").release()
    with pytest.raises(GraphError) as caught:
        limits.admit("a", "m", "sendMail")
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "51"
    uploads = Limits(LimitSettings(upload_bytes_per_window=100, upload_window=30), clock)
    uploads.admit("a", "m", "uploadChunk", upload_bytes=80).release()
    with pytest.raises(GraphError) as caught:
        uploads.admit("a", "m", "uploadChunk", upload_bytes=30)
    assert caught.value.headers["Retry-After"] == "31"
    clock.now += 31
    uploads.admit("a", "m", "uploadChunk", upload_bytes=30).release()


def test_limit_updates_are_checked():
    limits = Limits()
    assert limits.update(concurrency="6").concurrency == 6
    for bad in ({"concurrency": 0}, {"nope": 1}):
        with pytest.raises(ValueError):
            limits.update(**bad)


# ---------------------------------------------------------------------- faults, errors, settings
def test_faults_match_operation_and_mailbox_and_fire_count_times():
    queue = FaultQueue()
    queue.add(Fault(status=503, count=2, operation="sendMail", mailbox="A@x"))
    assert queue.take("send", "a@x") is None and queue.take("sendMail", "b@x") is None
    assert queue.take("sendMail", "a@x").status == 503
    assert queue.take("sendMail", "a@x") is not None and queue.take("sendMail", "a@x") is None
    assert len(queue.fired) == 2
    for bad in (
        {"kind": "nope"},
        {"status": 200},
        {"kind": "error"},
        {"status": 500, "operation": "x"},
        {"status": 500, "count": 0},
    ):
        with pytest.raises(ValueError):
            Fault(**bad)


def test_injected_error_defaults():
    assert (errors.injected(None, "ErrorQuotaExceeded", None, None).status) == 507
    throttled = errors.injected(429, None, None, 3)
    assert (throttled.code, throttled.headers) == ("ApplicationThrottled", {"Retry-After": "3"})
    assert errors.injected(504, None, None, None).code == "GatewayTimeout"
    assert errors.injected(418, "Custom", "m", None).code == "Custom"


def test_error_body_shape():
    body = errors.body(errors.send_as_denied(), "rid", "crid")["error"]
    assert body["code"] == "ErrorSendAsDenied" and body["innerError"]["request-id"] == "rid"
    assert body["innerError"]["client-request-id"] == "crid" and body["innerError"]["date"]


def test_settings_update_converts_and_refuses_unknown_or_negative():
    settings = GraphSettings().update(max_request_bytes="10", upload_reject_authorization="false")
    assert settings.max_request_bytes == 10 and settings.upload_reject_authorization is False
    for bad in ({"nope": 1}, {"upload_max_chunk": -1}):
        with pytest.raises(ValueError):
            GraphSettings().update(**bad)


# ---------------------------------------------------------------------- scopes (the Entra stand-in)
def test_scopes_of_several_resources_at_authorize_but_one_at_the_token_endpoint():
    mixed = "https://outlook.office.com/SMTP.Send https://graph.microsoft.com/Mail.Send Mail.ReadWrite offline_access"
    requests = scopes.parse_per_resource(mixed)
    assert {(r.resource, r.permissions) for r in requests} == {
        ("https://outlook.office.com", frozenset({"SMTP.Send"})),
        ("https://graph.microsoft.com", frozenset({"Mail.Send", "Mail.ReadWrite"})),
    }
    assert all(r.oidc == frozenset({"offline_access"}) for r in requests)
    with pytest.raises(AadstsError) as caught:
        scopes.parse(mixed)
    assert caught.value.code == 28000
    aliases = scopes.parse("https://outlook.office.com/SMTP.Send https://outlook.office365.com/IMAP.AccessAsUser.All")
    assert aliases.permissions == frozenset({"SMTP.Send", "IMAP.AccessAsUser.All"})
    assert scopes.parse_per_resource("openid profile")[0].resource is None


# ---------------------------------------------------------------------- tenant and permissions
@pytest.fixture
def tenant(tmp_path):
    import json

    from airflow_provider_o365mail.testing.graph.tenant import MailboxSettings, Tenant

    users = {
        "alex@x.test": {"oid": "oid-alex", "display_name": "Alex"},
        "blair@x.test": {"oid": "oid-blair", "display_name": "Blair"},
        "shared@x.test": {"oid": "oid-shared", "display_name": "Shared"},
        "nomail@x.test": {"oid": "oid-nomail", "display_name": "No Mailbox"},
    }
    (tmp_path / "directory.json").write_text(json.dumps({"users": users, "settings": {"clock_offset": 100}}))
    seed = {
        "alex@x.test": MailboxSettings(),
        "blair@x.test": MailboxSettings(),
        "shared@x.test": MailboxSettings(send_as=["alex@x.test"], full_access=["alex@x.test"]),
    }
    return Tenant(tmp_path / "directory.json", "x.test", seed)


def service_for(tenant):
    from airflow_provider_o365mail.testing.graph.service import GraphService

    return GraphService(tenant, None, None, None, GraphSettings(), tenant_id=TENANT, id_domain="d")  # type: ignore[arg-type]


def test_mailbox_resolution(tenant):
    assert tenant.resolve("ALEX@x.test").address == "alex@x.test" and tenant.resolve("oid-blair").oid == "oid-blair"
    assert code_of(lambda: tenant.resolve("ghost@x.test")) == (404, "ErrorInvalidUser")
    assert code_of(lambda: tenant.resolve("nomail@x.test")) == (404, "MailboxNotEnabledForRESTAPI")
    tenant.update_mailbox("alex@x.test", rest_enabled=False)
    assert code_of(lambda: tenant.resolve("alex@x.test")) == (404, "MailboxNotEnabledForRESTAPI")
    assert abs(tenant.now() - time.time() - 100) < 5
    with pytest.raises(ValueError):
        tenant.update_mailbox("blair@x.test", max_send_size=151 * 1024 * 1024)
    tenant.reset()
    assert tenant.resolve("alex@x.test").settings.rest_enabled


def test_permission_matrix(tenant):
    from airflow_provider_o365mail.testing.graph.tokens import Caller

    service = service_for(tenant)
    alex, shared = tenant.resolve("alex@x.test"), tenant.resolve("shared@x.test")
    delegated = Caller("app", True, frozenset({"Mail.Send", "Mail.ReadWrite"}), upn="alex@x.test")
    shared_scopes = Caller("app", True, frozenset({"Mail.Send.Shared", "Mail.ReadWrite.Shared"}), upn="alex@x.test")
    blair = Caller("app", True, frozenset({"Mail.Send.Shared"}), upn="blair@x.test")
    app = Caller("app", False, frozenset({"Mail.Send"}))
    service.authorize(delegated, alex, "sendMail")
    service.authorize(delegated, alex, "createUploadSession")
    service.authorize(delegated, alex, "listMessages")  # Mail.ReadWrite reads too
    send_only = Caller("app", True, frozenset({"Mail.Send"}), upn="alex@x.test")
    assert code_of(lambda: service.authorize(send_only, alex, "listMessages")) == (403, "ErrorAccessDenied")
    assert code_of(lambda: service.authorize(delegated, shared, "sendMail")) == (403, "ErrorAccessDenied")
    service.authorize(shared_scopes, shared, "sendMail")  # .Shared scope and Full Access
    assert code_of(lambda: service.authorize(shared_scopes, shared, "createUploadSession")) == (
        403,
        "ErrorAccessDenied",
    )
    assert code_of(lambda: service.authorize(blair, shared, "sendMail")) == (403, "ErrorAccessDenied")  # no Full Access
    service.authorize(app, shared, "sendMail")
    assert code_of(lambda: service.authorize(app, shared, "createMessage")) == (403, "ErrorAccessDenied")
    tenant.set_access_policy("app", ["alex@x.test"])
    assert code_of(lambda: service.authorize(app, shared, "sendMail")) == (403, "ErrorAccessDenied")
    assert code_of(lambda: service.mailbox(app, None)) == (400, "BadRequest")


def test_send_rights(tenant):
    from airflow_provider_o365mail.testing.graph.tokens import Caller

    service = service_for(tenant)
    alex, blair = tenant.resolve("alex@x.test"), tenant.resolve("blair@x.test")
    with_shared = Caller("app", True, frozenset({"Mail.Send", "Mail.Send.Shared"}), upn="alex@x.test")
    without_shared = Caller("app", True, frozenset({"Mail.Send"}), upn="alex@x.test")
    assert service._sender_for(with_shared, alex, None) is None
    assert service._sender_for(with_shared, alex, "shared@x.test") is None  # Send As: no Sender header
    assert code_of(lambda: service._sender_for(without_shared, alex, "shared@x.test")) == (403, "ErrorSendAsDenied")
    assert code_of(lambda: service._sender_for(with_shared, alex, "blair@x.test")) == (403, "ErrorSendAsDenied")
    tenant.update_mailbox("shared@x.test", send_as=[], send_on_behalf=["alex@x.test"])
    assert service._sender_for(with_shared, alex, "shared@x.test") == ("Alex", "alex@x.test")
    app = Caller("app", False, frozenset({"Mail.Send"}))
    assert code_of(lambda: service._sender_for(app, blair, "alex@x.test")) == (403, "ErrorSendAsDenied")
    assert service._sender_for(app, alex, "shared@x.test") == ("Alex", "alex@x.test")
