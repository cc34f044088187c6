"""The Microsoft Graph stand-in against plain ``requests`` and MSAL, never against the provider.

Every delivery is counted over IMAP by Message-ID (an IMAPClient session with a token minted by the
Entra stand-in), never taken from the stand-in's word. Absence is checked after a control message
sent later has arrived (the stand-in handles requests in order of their answers).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import uuid
from email.message import EmailMessage
from urllib.parse import parse_qs, urlsplit

import jwt
import msal
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from airflow_provider_o365mail.testing import mailbox as mb
from airflow_provider_o365mail.testing.admin import tls_session
from airflow_provider_o365mail.testing.sandbox import (
    DELEGATED_SCOPES,
    GRAPH,
    GRAPH_DELEGATED_SCOPES,
    REDIRECT_URI,
    Sandbox,
)

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
MiB = 1024 * 1024
CHUNK = 3_932_160  # 12 x 320 KiB: within Outlook's 4 MB per PUT and OneDrive's multiple-of-320-KiB rule


# ---------------------------------------------------------------------- tokens
def token_post(sbx, **form) -> requests.Response:
    form.setdefault("client_id", sbx.client_id)
    form.setdefault("client_secret", sbx.client_secret)
    return tls_session(sbx.ca_file).post(f"{sbx.authority}/oauth2/v2.0/token", data=form, timeout=30)


def delegated_token(sbx, refresh_token: str, scope: str = GRAPH_DELEGATED_SCOPES) -> str:
    response = token_post(sbx, grant_type="refresh_token", refresh_token=refresh_token, scope=scope)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def app_token(sbx, scope: str = f"{GRAPH}/.default") -> str:
    app = msal.ConfidentialClientApplication(
        sbx.app_client_id,
        client_credential=sbx.app_client_secret,
        authority=sbx.authority,
        instance_discovery=False,
        http_client=tls_session(sbx.ca_file),
    )
    result = app.acquire_token_for_client([scope])
    assert "access_token" in result, result
    return result["access_token"]


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


@pytest.fixture(scope="module")
def grant(o365_sandbox) -> str:
    """A fresh grant of the sandbox user for this module (other modules may revoke older refresh tokens)."""
    return o365_sandbox.new_refresh_token()


@pytest.fixture(scope="module")
def alex(o365_sandbox, grant) -> str:
    """A delegated Graph token of the sandbox user (Mail.Send, Mail.ReadWrite, the .Shared ones)."""
    return delegated_token(o365_sandbox, grant)


@pytest.fixture
def graph(o365_sandbox, o365_admin):
    """A client for the stand-in; the admin fixture puts Graph back to its defaults afterwards."""
    assert o365_sandbox.graph_url, "the sandbox has no Graph stand-in"
    o365_admin.graph_reset()
    return Graph(o365_sandbox)


class Graph:
    def __init__(self, sbx) -> None:
        self.sbx = sbx
        self.base = f"{sbx.graph_url}/v1.0"
        self.session = tls_session(sbx.ca_file)

    def post(self, path: str, token: str | None, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.session.post(f"{self.base}/{path}", headers=headers, timeout=120, **kwargs)

    def get(self, path: str, token: str, **kwargs) -> requests.Response:
        return self.session.get(
            f"{self.base}/{path}", headers={"Authorization": f"Bearer {token}"}, timeout=60, **kwargs
        )

    def send(self, token: str, who: str = "me", *, message_id: str | None = None, to: str | None = None, **fields):
        message = {
            "subject": fields.pop("subject", "graph stand-in"),
            "body": {"contentType": "Text", "content": "sent through the Graph stand-in"},
            "toRecipients": [{"emailAddress": {"address": to or self.sbx.second_user}}],
            **fields,
        }
        if message_id:
            message["internetMessageId"] = message_id
        return self.post(f"{who}/sendMail", token, json={"message": message})

    def sent_items(self, token: str, message_id: str, who: str = "me") -> list[dict]:
        response = self.get(
            f"{who}/mailFolders/SentItems/messages",
            token,
            params={"$filter": f"internetMessageId eq '{message_id}'", "$select": "id,internetMessageId"},
        )
        assert response.status_code == 200, response.text
        return response.json()["value"]


def new_id() -> str:
    return f"<{uuid.uuid4().hex}@graph-test.sandbox.test>"


# ---------------------------------------------------------------------- reading mailboxes over IMAP
def arrived(sbx, upn: str, message_id: str, folder: str = "INBOX") -> list[tuple[EmailMessage, tuple]]:
    """Messages of ``folder`` whose Message-ID is exactly ``message_id``, with their IMAP flags."""
    with mb.imap_session(sbx, upn) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["HEADER", "Message-ID", message_id])
        fetched = client.fetch(uids, ["BODY.PEEK[]", "FLAGS"]) if uids else {}
    found = [(mb.parse(data[b"BODY[]"]), data[b"FLAGS"]) for data in fetched.values()]
    return [(m, flags) for m, flags in found if str(m["Message-ID"]).strip() == message_id]


def wait_arrived(sbx, upn: str, message_id: str, folder: str = "INBOX", count: int = 1, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        found = arrived(sbx, upn, message_id, folder)
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, f"{len(found)} of {count} arrived in {upn}/{folder}"
            return found
        time.sleep(0.2)


def control_message(graph: Graph, token: str) -> None:
    """Send one more message and wait for it: everything answered before it has been processed."""
    message_id = new_id()
    assert graph.send(token, message_id=message_id).status_code == 202
    wait_arrived(graph.sbx, graph.sbx.second_user, message_id)


def assert_graph_error(response: requests.Response, status: int, code: str, client_request_id: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    inner = error["innerError"]
    assert inner["request-id"] == response.headers["request-id"]
    assert inner["client-request-id"] == response.headers["client-request-id"]
    assert inner["date"]
    if client_request_id:
        assert response.headers["client-request-id"] == client_request_id
    return error


# ====================================================================== tokens: one refresh token, two resources
def test_one_refresh_token_mints_exchange_and_graph_tokens(o365_sandbox, o365_admin):
    sbx = o365_sandbox
    refresh_token = sbx.new_refresh_token()
    app = msal.ConfidentialClientApplication(
        sbx.client_id,
        client_credential=sbx.client_secret,
        authority=sbx.authority,
        instance_discovery=False,
        http_client=tls_session(sbx.ca_file),
    )
    exchange = app.acquire_token_by_refresh_token(refresh_token, DELEGATED_SCOPES.split())
    assert claims(exchange["access_token"])["aud"] == "https://outlook.office.com"
    account = app.get_accounts(username=sbx.user)[0]
    graph = app.acquire_token_silent_with_error([f"{GRAPH}/Mail.Send", f"{GRAPH}/Mail.ReadWrite"], account=account)
    assert graph and "access_token" in graph, graph
    graph_claims = claims(graph["access_token"])
    assert graph_claims["aud"] == GRAPH_APP_ID
    assert {"Mail.Send", "Mail.ReadWrite"} <= set(graph_claims["scp"].split())
    assert "roles" not in graph_claims or not graph_claims["roles"]

    app_only = claims(app_token(sbx))
    assert app_only["aud"] == GRAPH and {"Mail.Send", "Mail.ReadWrite"} <= set(app_only["roles"])
    assert "scp" not in app_only


def test_graph_consent_switch_gives_aadsts65001_for_graph_only(o365_sandbox, o365_admin):
    sbx = o365_sandbox
    refresh_token = sbx.new_refresh_token()
    assert o365_admin.revoke_consent(sbx.user, sbx.client_id, resource=GRAPH)
    refused = token_post(sbx, grant_type="refresh_token", refresh_token=refresh_token, scope=f"{GRAPH}/Mail.Send")
    assert refused.status_code == 400 and refused.json()["error_codes"] == [65001], refused.text
    assert refused.json()["suberror"] == "consent_required"
    exchange = token_post(sbx, grant_type="refresh_token", refresh_token=refresh_token, scope=DELEGATED_SCOPES)
    assert exchange.status_code == 200, "Exchange consent must survive removing Graph's"
    o365_admin.consent(sbx.user, sbx.client_id, f"{GRAPH}/Mail.Send")
    again = token_post(sbx, grant_type="refresh_token", refresh_token=refresh_token, scope=f"{GRAPH}/Mail.Send")
    assert again.status_code == 200 and claims(again.json()["access_token"])["scp"] == "Mail.Send"

    o365_admin.set_app_roles(sbx.app_client_id, GRAPH, [])
    no_roles = claims(app_token(sbx))
    assert not no_roles.get("roles")


def test_one_consent_for_exchange_and_graph_then_one_resource_per_redemption(o365_sandbox, o365_admin):
    """/authorize takes scopes of both resources; the token endpoint wants a subset of one (else AADSTS28000)."""
    sbx = o365_sandbox
    o365_admin.revoke_consent(sbx.second_user, sbx.client_id)
    exchange_scopes = DELEGATED_SCOPES.split()
    graph_scopes = [f"{GRAPH}/Mail.Send", f"{GRAPH}/Mail.ReadWrite"]
    app = msal.ConfidentialClientApplication(
        sbx.client_id,
        client_credential=sbx.client_secret,
        authority=sbx.authority,
        instance_discovery=False,
        http_client=tls_session(sbx.ca_file),
    )

    def consent_page():
        flow = app.initiate_auth_code_flow(
            exchange_scopes + graph_scopes, redirect_uri=REDIRECT_URI, login_hint=sbx.second_user
        )
        location = o365_admin.sign_in(flow["auth_uri"], login=sbx.second_user, password=sbx.user_password)
        return flow, {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}

    flow, params = consent_page()
    mixed = app.acquire_token_by_auth_code_flow(flow, params)  # MSAL redeems the whole union
    assert mixed.get("error") == "invalid_request" and 28000 in mixed.get("error_codes", []), mixed
    flow, params = consent_page()
    result = app.acquire_token_by_auth_code_flow(flow, params, scopes=exchange_scopes)
    assert claims(result["access_token"])["aud"] == "https://outlook.office.com", result
    graph = app.acquire_token_silent(graph_scopes, account=app.get_accounts(username=sbx.second_user)[0])
    assert graph and claims(graph["access_token"])["aud"] == GRAPH_APP_ID, graph


# ====================================================================== authentication and authorization
def test_token_checks(o365_sandbox, grant, graph, alex):
    sbx = o365_sandbox
    crid = str(uuid.uuid4())
    assert_graph_error(graph.send(""), 401, "InvalidAuthenticationToken")
    exchange = delegated_token(sbx, grant, scope=DELEGATED_SCOPES)
    error = assert_graph_error(
        graph.post("me/sendMail", exchange, json={"message": {}}, headers={"client-request-id": crid}),
        401,
        "InvalidAuthenticationToken",
        client_request_id=crid,
    )
    assert "audience" in error["message"].lower()
    forged = jwt.encode(
        {**claims(alex)},
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
        headers={"kid": jwt.get_unverified_header(alex)["kid"]},
    )
    assert_graph_error(graph.send(forged), 401, "InvalidAuthenticationToken")
    expired = sbx.admin().mint_access_token(sbx.user, audience=GRAPH_APP_ID, scp="Mail.Send", lifetime=-600)
    assert_graph_error(graph.send(expired), 401, "InvalidAuthenticationToken")

    read_write_only = delegated_token(sbx, grant, scope=f"{GRAPH}/Mail.ReadWrite")
    assert_graph_error(graph.send(read_write_only), 403, "ErrorAccessDenied")
    send_only = delegated_token(sbx, grant, scope=f"{GRAPH}/Mail.Send")
    assert_graph_error(graph.post("me/messages", send_only, json={"subject": "x"}), 403, "ErrorAccessDenied")
    error = assert_graph_error(graph.send(app_token(sbx)), 400, "BadRequest")
    assert "/me request is only valid with delegated authentication flow" in error["message"]
    control_message(graph, alex)


def test_unknown_paths_and_methods_answer_in_graphs_shape(o365_sandbox, graph, alex):
    session = graph.session
    assert_graph_error(session.get(f"{o365_sandbox.graph_url}/beta/me/messages", timeout=30), 400, "BadRequest")
    assert_graph_error(graph.get("me/nonsense", alex), 400, "BadRequest")
    assert_graph_error(graph.get("me/sendMail", alex), 405, "Request_BadRequest")


def test_app_only_token_without_roles_and_access_policy(o365_sandbox, o365_admin, graph):
    sbx = o365_sandbox
    token = app_token(sbx)
    message_id = new_id()
    assert graph.send(token, f"users/{sbx.user}", message_id=message_id).status_code == 202
    wait_arrived(sbx, sbx.second_user, message_id)

    o365_admin.graph_access_policy(sbx.app_client_id, [sbx.second_user])
    error = assert_graph_error(graph.send(token, f"users/{sbx.user}"), 403, "ErrorAccessDenied")
    assert error["message"] == "Access to OData is disabled."
    o365_admin.graph_access_policy(sbx.app_client_id, None)

    o365_admin.set_app_roles(sbx.app_client_id, GRAPH, ["Mail.ReadWrite"])
    assert_graph_error(graph.send(app_token(sbx), f"users/{sbx.user}"), 403, "ErrorAccessDenied")
    o365_admin.set_app_roles(sbx.app_client_id, GRAPH, [])
    assert_graph_error(graph.send(app_token(sbx), f"users/{sbx.user}"), 401, "InvalidAuthenticationToken")


# ====================================================================== sendMail
def test_send_mail_json_reaches_inboxes_and_sent_items_with_its_message_id(o365_sandbox, graph, alex):
    sbx = o365_sandbox
    message_id = new_id()
    response = graph.send(
        alex,
        message_id=message_id,
        ccRecipients=[{"emailAddress": {"address": sbx.shared_mailbox}}],
        bccRecipients=[{"emailAddress": {"address": sbx.user, "name": "Alex"}}],
        internetMessageHeaders=[{"name": "x-run-id", "value": "42"}],
    )
    assert response.status_code == 202 and response.content == b""
    assert response.headers["request-id"] and response.headers["client-request-id"]
    [(to_copy, _)] = wait_arrived(sbx, sbx.second_user, message_id)
    [(cc_copy, _)] = wait_arrived(sbx, sbx.shared_mailbox, message_id)
    [(bcc_copy, _)] = wait_arrived(sbx, sbx.user, message_id)
    for copy in (to_copy, cc_copy, bcc_copy):
        assert "Bcc" not in copy and copy["x-run-id"] == "42" and sbx.user in copy["From"]
    [(sent, flags)] = wait_arrived(sbx, sbx.user, message_id, "Sent Items")
    assert sbx.user in sent["Bcc"] and b"\\Seen" in flags
    assert graph.sent_items(alex, message_id) == [
        {
            "@odata.etag": graph.sent_items(alex, message_id)[0]["@odata.etag"],
            "id": graph.sent_items(alex, message_id)[0]["id"],
            "internetMessageId": message_id,
        }
    ]


def test_save_to_sent_items_false_as_string_and_a_generated_message_id(o365_sandbox, graph, alex):
    sbx = o365_sandbox
    unsaved = new_id()
    message = {
        "subject": "not saved",
        "toRecipients": [{"emailAddress": {"address": sbx.second_user}}],
        "internetMessageId": unsaved,
    }
    assert graph.post("me/sendMail", alex, json={"message": message, "saveToSentItems": "false"}).status_code == 202
    wait_arrived(sbx, sbx.second_user, unsaved)
    subject = f"no id {uuid.uuid4().hex}"
    assert graph.send(alex, subject=subject).status_code == 202
    [received] = mb.wait_for_messages(sbx, sbx.second_user, mb.with_subject(subject))
    generated = str(received["Message-ID"])
    assert generated.startswith("<") and graph.sent_items(alex, generated)[0]["internetMessageId"] == generated
    wait_arrived(sbx, sbx.user, generated, "Sent Items")
    assert arrived(sbx, sbx.user, unsaved, "Sent Items") == []
    assert_graph_error(
        graph.post("me/sendMail", alex, json={"message": message, "saveToSentItems": "maybe"}), 400, "BadRequest"
    )


def test_send_mail_mime(o365_sandbox, graph, alex):
    sbx = o365_sandbox
    message_id = new_id()
    raw = (
        f"From: {sbx.user}\r\nTo: {sbx.second_user}\r\nSubject: mime\r\nMessage-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nsent as MIME\r\n"
    ).encode()
    encoded = base64.encodebytes(raw)  # with line breaks, like Microsoft's example
    response = graph.post("me/sendMail", alex, data=encoded, headers={"Content-Type": "text/plain"})
    assert response.status_code == 202, response.text
    [(copy, _)] = wait_arrived(sbx, sbx.second_user, message_id)
    assert copy.get_content().strip() == "sent as MIME"
    wait_arrived(sbx, sbx.user, message_id, "Sent Items")
    bad = graph.post("me/sendMail", alex, data=b"this is *not* base64!", headers={"Content-Type": "text/plain"})
    error = assert_graph_error(bad, 400, "ErrorMimeContentInvalidBase64String")
    assert error["message"] == "Invalid base64 string for MIME content."


def test_send_as_and_shared_mailboxes(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    shared_from = {"from": {"emailAddress": {"address": sbx.shared_mailbox}}}
    as_shared = new_id()
    assert graph.send(alex, message_id=as_shared, **shared_from).status_code == 202  # alex has Send As on shared
    [(copy, _)] = wait_arrived(sbx, sbx.second_user, as_shared)
    assert sbx.shared_mailbox in copy["From"] and "Sender" not in copy

    blair = sbx.admin().mint_access_token(
        sbx.second_user, audience=GRAPH_APP_ID, scp="Mail.Send Mail.Send.Shared", client_id=sbx.client_id
    )
    assert_graph_error(graph.send(blair, to=sbx.user, **shared_from), 403, "ErrorSendAsDenied")
    assert_graph_error(
        graph.send(app_token(sbx), f"users/{sbx.second_user}", **{"from": {"emailAddress": {"address": sbx.user}}}),
        403,
        "ErrorSendAsDenied",
    )

    via_shared = new_id()  # /users/{shared}: Full Access + Send As; the copy goes to shared's Sent Items
    assert graph.send(alex, f"users/{sbx.shared_mailbox}", message_id=via_shared).status_code == 202
    wait_arrived(sbx, sbx.shared_mailbox, via_shared, "Sent Items")
    assert arrived(sbx, sbx.user, via_shared, "Sent Items") == []
    assert_graph_error(graph.send(blair, f"users/{sbx.shared_mailbox}"), 403, "ErrorAccessDenied")

    o365_admin.graph_mailbox(sbx.shared_mailbox, send_as=[], send_on_behalf=[sbx.user])
    behalf = new_id()
    assert graph.send(alex, message_id=behalf, **shared_from).status_code == 202
    [(copy, _)] = wait_arrived(sbx, sbx.second_user, behalf)
    assert sbx.shared_mailbox in copy["From"] and sbx.user in copy["Sender"]


def test_unknown_user_not_rest_enabled_and_object_id(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    error = assert_graph_error(graph.send(alex, "users/nobody@o365.sandbox.test"), 404, "ErrorInvalidUser")
    assert "nobody@o365.sandbox.test" in error["message"]
    o365_admin.graph_mailbox(sbx.user, rest_enabled=False)
    assert_graph_error(graph.send(alex), 404, "MailboxNotEnabledForRESTAPI")
    o365_admin.graph_mailbox(sbx.user, rest_enabled=True)
    message_id = new_id()
    assert graph.send(alex, f"users/{claims(alex)['oid']}", message_id=message_id).status_code == 202
    wait_arrived(sbx, sbx.second_user, message_id)


def test_recipients(o365_sandbox, graph, alex):
    sbx = o365_sandbox
    nobody = graph.post("me/sendMail", alex, json={"message": {"subject": "no recipients"}})
    assert "no recipients" in assert_graph_error(nobody, 400, "ErrorInvalidRecipients")["message"]
    bad_id = new_id()
    assert_graph_error(graph.send(alex, to="bad", message_id=bad_id), 400, "ErrorInvalidRecipients")
    outside = new_id()  # a valid address the sandbox cannot reach: 202, then a non-delivery report
    subject = f"outside {uuid.uuid4().hex}"
    assert graph.send(alex, to="someone@example.com", message_id=outside, subject=subject).status_code == 202
    [ndr] = mb.wait_for_messages(sbx, sbx.user, mb.with_subject(f"Undeliverable: {subject}"))
    assert "someone@example.com" in ndr.get_body(("plain",)).get_content()
    control_message(graph, alex)
    assert arrived(sbx, sbx.second_user, bad_id) == [] and arrived(sbx, sbx.user, bad_id, "Sent Items") == []


# ====================================================================== sizes
def test_request_and_message_size_limits(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    too_big = {
        "message": {"subject": "x" * (4 * MiB), "toRecipients": [{"emailAddress": {"address": sbx.second_user}}]}
    }
    assert_graph_error(graph.post("me/sendMail", alex, json=too_big), 413, "RequestEntityTooLarge")
    o365_admin.graph_mailbox(sbx.user, max_send_size=MiB)
    oversized = new_id()
    attachment = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": "data.bin",
        "contentBytes": base64.b64encode(os.urandom(MiB)).decode(),
    }
    response = graph.send(alex, message_id=oversized, attachments=[attachment])
    assert_graph_error(response, 400, "ErrorMessageSizeExceeded")
    with pytest.raises(requests.HTTPError):
        o365_admin.graph_mailbox(sbx.user, max_send_size=151 * MiB)  # MaxSendSize tops out at 150 MB
    o365_admin.graph_mailbox(sbx.user, max_send_size=35 * MiB)
    control_message(graph, alex)
    assert arrived(sbx, sbx.second_user, oversized) == []


# ====================================================================== drafts and attachments
def test_draft_with_small_attachment_then_send(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    message_id = new_id()
    draft = graph.post(
        "me/messages",
        alex,
        json={
            "subject": "draft",
            "body": {"contentType": "HTML", "content": "<p>draft</p>"},
            "toRecipients": [{"emailAddress": {"address": sbx.second_user}}],
            "internetMessageId": message_id,
        },
    )
    assert draft.status_code == 201, draft.text
    assert draft.json()["isDraft"] is True and draft.json()["internetMessageId"] == message_id
    draft_id = draft.json()["id"]
    wait_arrived(sbx, sbx.user, message_id, "Drafts")
    content = os.urandom(200_000)
    added = graph.post(
        f"me/messages/{draft_id}/attachments",
        alex,
        json={
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": "small.bin",
            "contentBytes": base64.b64encode(content).decode(),
        },
    )
    assert added.status_code == 201 and added.json()["size"] == len(content), added.text

    def attach(size: int) -> requests.Response:
        item = {"@odata.type": "#microsoft.graph.fileAttachment", "name": "more.bin"}
        return graph.post(
            f"me/messages/{draft_id}/attachments",
            alex,
            json={**item, "contentBytes": base64.b64encode(os.urandom(size)).decode()},
        )

    assert_graph_error(attach(3 * MiB), 413, "RequestEntityTooLarge")  # 4 MB once base64-encoded
    o365_admin.graph_settings(inline_attachment_limit=100_000)
    assert attach(100_000).status_code == 413
    o365_admin.graph_settings(inline_attachment_limit=3 * MiB)
    sent = graph.post(f"me/messages/{draft_id}/send", alex, headers={"Content-Length": "0"})
    assert sent.status_code == 202 and sent.content == b""
    [(copy, _)] = wait_arrived(sbx, sbx.second_user, message_id)
    [part] = list(copy.iter_attachments())
    assert part.get_filename() == "small.bin" and part.get_content() == content
    wait_arrived(sbx, sbx.user, message_id, "Sent Items")
    assert arrived(sbx, sbx.user, message_id, "Drafts") == []
    assert_graph_error(graph.post(f"me/messages/{draft_id}/send", alex), 404, "ErrorItemNotFound")


def test_upload_session_rules(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    draft_id = graph.post("me/messages", alex, json={"subject": "uploads"}).json()["id"]

    def session(size: int, who: str = "me", token: str = alex) -> requests.Response:
        return graph.post(
            f"{who}/messages/{draft_id}/attachments/createUploadSession",
            token,
            json={"AttachmentItem": {"attachmentType": "file", "name": "f.bin", "size": size}},
        )

    assert_graph_error(session(3 * MiB - 1), 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
    assert_graph_error(session(150 * MiB + 1), 400, "ErrorMessageSizeExceeded")
    created = session(4 * MiB)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["nextExpectedRanges"] == ["0-"] and body["expirationDateTime"].endswith("Z")
    url = body["uploadUrl"]
    assert urlsplit(url).hostname != urlsplit(sbx.graph_url).hostname and "authtoken=" in url
    plain = tls_session(sbx.ca_file)
    data = os.urandom(4 * MiB)

    def put(start: int, end: int, **headers) -> requests.Response:
        return plain.put(
            url,
            data=data[start : end + 1],
            headers={"Content-Range": f"bytes {start}-{end}/{len(data)}", **headers},
            timeout=60,
        )

    assert put(0, CHUNK - 1, Authorization=f"Bearer {alex}").status_code == 401
    assert put(1000, CHUNK - 1).status_code == 416
    first = put(0, MiB - 1)
    assert first.status_code == 200 and first.json()["nextExpectedRanges"] == [str(MiB)], first.text
    assert put(0, MiB - 1).status_code == 416  # again from 0: out of order
    assert plain.delete(url, timeout=30).status_code == 204
    assert_graph_error(put(MiB, 2 * MiB - 1), 404, "ErrorItemNotFound")
    assert_graph_error(
        plain.put(url.replace("authtoken=", "authtoken=x"), data=b"x", timeout=30), 404, "ErrorItemNotFound"
    )

    big_chunk = session(6 * MiB).json()["uploadUrl"]
    over = plain.put(
        big_chunk, data=os.urandom(4 * MiB + 1), headers={"Content-Range": f"bytes 0-{4 * MiB}/{6 * MiB}"}, timeout=60
    )
    assert over.status_code == 413

    expiring = session(4 * MiB).json()["uploadUrl"]
    o365_admin.update_settings(clock_offset=o365_admin.graph_state()["settings"]["upload_session_lifetime"] + 60)
    late = plain.put(expiring, data=data[:MiB], headers={"Content-Range": f"bytes 0-{MiB - 1}/{4 * MiB}"}, timeout=60)
    assert_graph_error(late, 404, "ErrorItemNotFound")
    o365_admin.update_settings(clock_offset=0)

    shared_draft = graph.post(f"users/{sbx.shared_mailbox}/messages", alex, json={"subject": "shared"})
    assert shared_draft.status_code == 201, shared_draft.text
    known_issue = graph.post(
        f"users/{sbx.shared_mailbox}/messages/{shared_draft.json()['id']}/attachments/createUploadSession",
        alex,
        json={"AttachmentItem": {"attachmentType": "file", "name": "f.bin", "size": 4 * MiB}},
    )
    assert_graph_error(known_issue, 403, "ErrorAccessDenied")


# ====================================================================== Sent Items lookup covers SMTP too
def test_sent_items_lookup_finds_mail_sent_over_smtp(o365_sandbox, grant, graph, alex):
    import smtplib
    import ssl

    sbx = o365_sandbox
    message_id = new_id()
    message = EmailMessage()
    message["From"], message["To"], message["Subject"], message["Message-ID"] = (
        sbx.user,
        sbx.second_user,
        "smtp",
        message_id,
    )
    message.set_content("over SMTP")
    token = sbx.admin().mint_access_token(sbx.user)
    with smtplib.SMTP("127.0.0.1", sbx.smtp_port, timeout=30) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=sbx.ca_file))
        smtp.ehlo()
        sasl = base64.b64encode(f"user={sbx.user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        assert smtp.docmd("AUTH", f"XOAUTH2 {sasl}")[0] == 235
        smtp.send_message(message)
    wait_arrived(sbx, sbx.user, message_id, "Sent Items")
    [found] = graph.sent_items(alex, message_id)
    assert found["internetMessageId"] == message_id and set(found) == {"@odata.etag", "id", "internetMessageId"}
    send_only = delegated_token(sbx, grant, scope=f"{GRAPH}/Mail.Send")
    response = graph.get(
        "me/mailFolders/SentItems/messages", send_only, params={"$filter": f"internetMessageId eq '{message_id}'"}
    )
    assert_graph_error(response, 403, "ErrorAccessDenied")  # reading Sent Items needs a Mail.Read* permission


# ====================================================================== throttling and faults
def test_mailbox_concurrency_limit(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    o365_admin.graph_fault("hold", count=4, operation="sendMail")
    ids = [new_id() for _ in range(6)]
    answers: dict[str, requests.Response] = {}

    def send(message_id: str) -> None:
        answers[message_id] = Graph(sbx).send(alex, message_id=message_id)

    threads = [threading.Thread(target=send, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while True:
        state = o365_admin.graph_state()
        counters = state["counters"].get(sbx.user, {})
        if state["held"] == 4 and counters.get("throttled") == 2:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert o365_admin.graph_release() == 4
    for thread in threads:
        thread.join(60)
    throttled = [r for r in answers.values() if r.status_code == 429]
    assert sorted(r.status_code for r in answers.values()) == [202] * 4 + [429] * 2
    for response in throttled:
        error = assert_graph_error(response, 429, "ApplicationThrottled")
        assert error["message"] == "Application is over its MailboxConcurrency limit."
        assert int(response.headers["Retry-After"]) >= 1
    counters = o365_admin.graph_counters(sbx.user)
    assert counters["peak_concurrency"] == 4 and counters["in_flight"] == 0
    delivered = [i for i in ids if answers[i].status_code == 202]
    for message_id in delivered:
        wait_arrived(sbx, sbx.second_user, message_id)
    for message_id in set(ids) - set(delivered):
        assert arrived(sbx, sbx.second_user, message_id) == []


def test_request_rate_window_and_upload_budget(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    o365_admin.graph_settings(requests_per_window=3, request_window=600)
    ids = [new_id() for _ in range(4)]
    answers = [graph.send(alex, message_id=i) for i in ids]
    assert [r.status_code for r in answers] == [202, 202, 202, 429]
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 600
    o365_admin.graph_settings(requests_per_window=10_000)
    o365_admin.graph_reset_counters()
    for message_id in ids[:3]:
        wait_arrived(sbx, sbx.second_user, message_id)
    assert arrived(sbx, sbx.second_user, ids[3]) == []

    o365_admin.graph_settings(upload_bytes_per_window=6 * MiB)
    draft_id = graph.post("me/messages", alex, json={"subject": "budget"}).json()["id"]
    url = graph.post(
        f"me/messages/{draft_id}/attachments/createUploadSession",
        alex,
        json={"AttachmentItem": {"attachmentType": "file", "name": "f.bin", "size": 2 * CHUNK}},
    ).json()["uploadUrl"]
    data = os.urandom(2 * CHUNK)
    plain = tls_session(sbx.ca_file)
    first = plain.put(url, data=data[:CHUNK], headers={"Content-Range": f"bytes 0-{CHUNK - 1}/{2 * CHUNK}"}, timeout=60)
    assert first.status_code == 200
    second = plain.put(
        url, data=data[CHUNK:], headers={"Content-Range": f"bytes {CHUNK}-{2 * CHUNK - 1}/{2 * CHUNK}"}, timeout=60
    )
    assert_graph_error(second, 429, "ApplicationThrottled")
    assert int(second.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"status": 503, "retry_after": 7}, 503, "serviceNotAvailable"),
        ({"status": 504}, 504, "GatewayTimeout"),
        ({"code": "ErrorQuotaExceeded"}, 507, "ErrorQuotaExceeded"),
        ({"code": "ErrorMessageSizeExceeded"}, 400, "ErrorMessageSizeExceeded"),
    ],
)
def test_injected_errors_deliver_nothing(o365_sandbox, o365_admin, graph, alex, fault, status, code):
    sbx = o365_sandbox
    o365_admin.graph_fault(**fault, operation="sendMail")
    message_id = new_id()
    response = graph.send(alex, message_id=message_id)
    assert_graph_error(response, status, code)
    if fault.get("retry_after"):
        assert response.headers["Retry-After"] == "7"
    control_message(graph, alex)
    assert arrived(sbx, sbx.second_user, message_id) == []


def test_throttled_twice_then_accepted_once(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    o365_admin.graph_throttle(count=2, retry_after=1, operation="sendMail")
    message_id = new_id()
    statuses = []
    for _ in range(3):
        response = graph.send(alex, message_id=message_id)
        statuses.append(response.status_code)
        if response.status_code != 429:
            break
        assert response.headers["Retry-After"] == "1"
    assert statuses == [429, 429, 202]
    wait_arrived(sbx, sbx.second_user, message_id, count=1)


def test_504_but_delivered_and_dropped_connection_after_delivery(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    o365_admin.graph_fault("after_delivery", status=504, operation="sendMail")
    ambiguous = new_id()
    assert_graph_error(graph.send(alex, message_id=ambiguous), 504, "GatewayTimeout")
    wait_arrived(sbx, sbx.second_user, ambiguous, count=1)
    assert graph.sent_items(alex, ambiguous), "the client's check for an ambiguous send finds it"

    o365_admin.graph_fault("drop_after_delivery", operation="sendMail")
    dropped = new_id()
    with pytest.raises(requests.ConnectionError):
        Graph(sbx).send(alex, message_id=dropped)
    wait_arrived(sbx, sbx.second_user, dropped, count=1)
    log = {d["message_id"]: d for d in o365_admin.graph_deliveries()}
    assert log[ambiguous]["delivered"] == [sbx.second_user] and log[dropped]["sent_items"] is True
    counters = o365_admin.graph_counters(sbx.user)
    assert counters["by_operation"]["sendMail"] >= 2 and counters["in_flight"] == 0


# ====================================================================== a 100 MB attachment, intact
def test_100_mb_attachment_through_an_upload_session_arrives_intact(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    o365_admin.graph_mailbox(sbx.user, max_send_size=150 * MiB)  # as an admin raises MaxSendSize for big files
    size = 100 * MiB
    data = os.urandom(size)
    message_id = new_id()
    draft = graph.post(
        "me/messages",
        alex,
        json={
            "subject": "100 MB",
            "toRecipients": [{"emailAddress": {"address": sbx.second_user}}],
            "internetMessageId": message_id,
        },
    )
    draft_id = draft.json()["id"]
    url = graph.post(
        f"me/messages/{draft_id}/attachments/createUploadSession",
        alex,
        json={
            "AttachmentItem": {
                "attachmentType": "file",
                "name": "big.bin",
                "size": size,
                "contentType": "application/octet-stream",
            }
        },
    ).json()["uploadUrl"]
    plain = tls_session(sbx.ca_file)
    try:
        for start in range(0, size, CHUNK):
            end = min(start + CHUNK, size) - 1
            response = plain.put(
                url,
                data=data[start : end + 1],
                headers={"Content-Range": f"bytes {start}-{end}/{size}", "Content-Type": "application/octet-stream"},
                timeout=120,
            )
            if end + 1 < size:
                assert response.status_code == 200 and response.json()["nextExpectedRanges"] == [str(end + 1)], (
                    response.text
                )
        assert response.status_code == 201 and "/Attachments('" in response.headers["Location"], response.text
        assert graph.post(f"me/messages/{draft_id}/send", alex).status_code == 202
        [(copy, _)] = wait_arrived(sbx, sbx.second_user, message_id, timeout=120)
        [part] = list(copy.iter_attachments())
        assert hashlib.sha256(part.get_content()).hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        Sandbox(sbx.state_dir).clean_mailboxes()  # later fetches must not carry 137 MB each
