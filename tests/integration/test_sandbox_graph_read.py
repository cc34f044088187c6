"""Reading mail through the Graph stand-in, against plain ``requests``, checked over IMAP.

The stand-in and IMAP read the same Dovecot mailboxes: mail submitted over SMTP must show up in
Graph, and what Graph changes (read flag, flag, move, delete) must show up over IMAP. Each test
works in folders or on Message-IDs of its own and counts what it finds, never the stand-in's word.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import time
import uuid
from email.message import EmailMessage

import msal
import pytest
import requests

from airflow_provider_o365mail.testing import mailbox as mb
from airflow_provider_o365mail.testing.admin import tls_session
from airflow_provider_o365mail.testing.sandbox import GRAPH, GRAPH_DELEGATED_SCOPES, Sandbox


# ---------------------------------------------------------------------- clients
@pytest.fixture(scope="module")
def alex(o365_sandbox) -> str:
    """A delegated Graph token of the sandbox user (Mail.ReadWrite, Mail.ReadWrite.Shared, Mail.Send)."""
    return _delegated(o365_sandbox, o365_sandbox.new_refresh_token())


def _delegated(sbx, refresh_token: str, scope: str = GRAPH_DELEGATED_SCOPES) -> str:
    form = {
        "client_id": sbx.client_id,
        "client_secret": sbx.client_secret,
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "scope": scope,
    }
    response = tls_session(sbx.ca_file).post(f"{sbx.authority}/oauth2/v2.0/token", data=form, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.fixture
def graph(o365_sandbox, o365_admin):
    o365_admin.graph_reset()
    return Graph(o365_sandbox)


class Graph:
    def __init__(self, sbx) -> None:
        self.sbx = sbx
        self.base = f"{sbx.graph_url}/v1.0"
        self.session = tls_session(sbx.ca_file)

    def call(self, method: str, path_or_url: str, token: str, **kwargs) -> requests.Response:
        url = path_or_url if path_or_url.startswith("https://") else f"{self.base}/{path_or_url}"
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return self.session.request(method, url, headers=headers, timeout=120, **kwargs)

    def get(self, path_or_url: str, token: str, **kwargs) -> requests.Response:
        return self.call("GET", path_or_url, token, **kwargs)

    def ok(self, path_or_url: str, token: str, **kwargs) -> dict:
        response = self.get(path_or_url, token, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def folder_id(self, token: str, name: str, who: str = "me") -> str:
        folders = self.ok(f"{who}/mailFolders", token, params={"$top": "100"})["value"]
        [found] = [f["id"] for f in folders if f["displayName"] == name]
        return found

    def by_message_id(self, token: str, message_id: str, folder: str = "inbox", who: str = "me") -> list[dict]:
        params = {"$filter": f"internetMessageId eq '{message_id}'"}
        return self.ok(f"{who}/mailFolders/{folder}/messages", token, params=params)["value"]

    def delta_round(self, url: str, token: str, page_size: int | None = None) -> tuple[list[dict], str, int]:
        """Follow a round to its deltaLink: (every change, the deltaLink, how many pages)."""
        headers = {"Prefer": f"odata.maxpagesize={page_size}"} if page_size else {}
        changes, pages = [], 0
        while True:
            page = self.ok(url, token, headers=headers)
            pages += 1
            assert len(page["value"]) <= (page_size or 1000)
            changes += page["value"]
            if "@odata.deltaLink" in page:
                assert "@odata.nextLink" not in page
                return changes, page["@odata.deltaLink"], pages
            url = page["@odata.nextLink"]


def assert_graph_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    assert error["innerError"]["request-id"] == response.headers["request-id"]
    return error


# ---------------------------------------------------------------------- mail in
def new_id() -> str:
    return f"<{uuid.uuid4().hex}@graph-read.sandbox.test>"


def message(message_id: str, subject: str, *, sender: str = "billing@vendor.test", to: str = "x@y.test", **extra):
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"], mail["Message-ID"] = sender, to, subject, message_id
    mail.set_content(extra.pop("body", f"body of {subject}"))
    for name, data in extra.pop("files", {}).items():
        mail.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return mail


def smtp_send(sbx, mail: EmailMessage) -> None:
    """Submit over SMTP (XOAUTH2 as the sandbox user): the path mail from outside takes into Dovecot."""
    token = sbx.admin().mint_access_token(sbx.user)
    with smtplib.SMTP("127.0.0.1", sbx.smtp_port, timeout=60) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=sbx.ca_file))
        smtp.ehlo()
        sasl = base64.b64encode(f"user={sbx.user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        assert smtp.docmd("AUTH", f"XOAUTH2 {sasl}")[0] == 235
        smtp.send_message(mail, from_addr=sbx.user)  # the envelope sender must be the login; From: may differ


def imap_flags(sbx, message_id: str, folder: str = "INBOX") -> list[set[bytes]]:
    """The IMAP flags of each message of ``folder`` whose Message-ID is exactly ``message_id``."""
    with mb.imap_session(sbx, sbx.user) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["HEADER", "Message-ID", message_id])
        fetched = client.fetch(uids, ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
    return [
        set(data[b"FLAGS"]) - {b"\\Recent"}
        for data in fetched.values()
        if message_id.encode() in data[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"]
    ]


def wait_in_inbox(sbx, message_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not imap_flags(sbx, message_id):
        assert time.monotonic() < deadline, f"{message_id} did not arrive"
        time.sleep(0.2)


@pytest.fixture
def folder(o365_sandbox):
    """A fresh folder of the sandbox user's mailbox (a new UIDVALIDITY), removed afterwards."""
    name = f"GraphRead-{uuid.uuid4().hex[:8]}"
    mb.recreate_folder(o365_sandbox, o365_sandbox.user, name)
    yield name
    with mb.imap_session(o365_sandbox, o365_sandbox.user) as client:
        for _, _, found in sorted(client.list_folders(name), key=lambda f: -len(f[2])):  # children first
            client.delete_folder(found)


def append(sbx, folder: str, mails: list[EmailMessage], flags: tuple = ()) -> None:
    with mb.imap_session(sbx, sbx.user) as client:
        for mail in mails:
            client.append(folder, mail.as_bytes(), flags=flags)


# ====================================================================== SMTP in, Graph out
def test_mail_submitted_over_smtp_is_read_through_graph(o365_sandbox, graph, alex):
    sbx = o365_sandbox
    message_id = new_id()
    payload = bytes(range(256)) * 40
    smtp_send(sbx, message(message_id, "smtp to graph", to=sbx.user, body="pizza on friday", files={"a.bin": payload}))
    wait_in_inbox(sbx, message_id)

    [listed] = graph.by_message_id(alex, message_id)
    assert listed["subject"] == "smtp to graph" and listed["isRead"] is False and listed["hasAttachments"] is True
    assert listed["from"]["emailAddress"]["address"] == "billing@vendor.test"
    assert listed["toRecipients"] == [{"emailAddress": {"name": sbx.user, "address": sbx.user}}]
    assert listed["parentFolderId"] == graph.folder_id(alex, "Inbox")
    got = graph.ok(f"me/messages/{listed['id']}", alex, headers={"Prefer": 'outlook.body-content-type="text"'})
    assert got["id"] == listed["id"] and got["body"]["contentType"] == "text" and "pizza" in got["body"]["content"]
    assert got["bodyPreview"].startswith("pizza on friday")
    headers = graph.ok(f"me/messages/{listed['id']}", alex, params={"$select": "internetMessageHeaders"})
    assert {"name": "Message-ID", "value": message_id} in headers["internetMessageHeaders"]
    assert set(headers) == {"@odata.context", "@odata.etag", "id", "internetMessageHeaders"}

    mime = graph.get(f"me/messages/{listed['id']}/$value", alex)
    assert mime.status_code == 200 and mb.parse(mime.content)["Message-ID"] == message_id

    [attachment] = graph.ok(f"me/messages/{listed['id']}/attachments", alex)["value"]
    assert attachment["@odata.type"] == "#microsoft.graph.fileAttachment" and attachment["name"] == "a.bin"
    assert base64.b64decode(attachment["contentBytes"]) == payload and attachment["size"] == len(payload)
    one = graph.ok(f"me/messages/{listed['id']}/attachments/{attachment['id']}", alex)
    assert one["id"] == attachment["id"] and base64.b64decode(one["contentBytes"]) == payload
    raw = graph.get(f"me/messages/{listed['id']}/attachments/{attachment['id']}/$value", alex, stream=True)
    assert raw.status_code == 200 and b"".join(raw.iter_content(4096)) == payload

    # The same message over IMAP is still unread: reading through Graph does not set \Seen.
    assert imap_flags(sbx, message_id) == [set()]


def test_attached_message_is_an_item_attachment_with_its_mime(o365_sandbox, graph, alex, folder):
    inner = message(new_id(), "the forwarded one")
    outer = message(new_id(), "has an item")
    outer.add_attachment(inner)
    append(o365_sandbox, folder, [outer])
    [listed] = graph.ok(f"me/mailFolders/{graph.folder_id(alex, folder)}/messages", alex)["value"]
    [item] = graph.ok(f"me/messages/{listed['id']}/attachments", alex)["value"]
    assert item["@odata.type"] == "#microsoft.graph.itemAttachment" and item["name"] == "the forwarded one"
    expanded = graph.ok(
        f"me/messages/{listed['id']}/attachments/{item['id']}",
        alex,
        params={"$expand": "microsoft.graph.itemattachment/item"},
    )
    assert expanded["item"]["internetMessageId"] == inner["Message-ID"]
    raw = graph.get(f"me/messages/{listed['id']}/attachments/{item['id']}/$value", alex)
    assert mb.parse(raw.content)["Message-ID"] == inner["Message-ID"]


# ====================================================================== Graph writes, IMAP sees
def test_read_flag_and_flag_status_are_imap_flags_both_ways(o365_sandbox, graph, alex):
    sbx = o365_sandbox
    message_id = new_id()
    smtp_send(sbx, message(message_id, "flags", to=sbx.user))
    wait_in_inbox(sbx, message_id)
    [listed] = graph.by_message_id(alex, message_id)

    response = graph.call(
        "PATCH", f"me/messages/{listed['id']}", alex, json={"isRead": True, "flag": {"flagStatus": "flagged"}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["isRead"] is True and response.json()["flag"] == {"flagStatus": "flagged"}
    assert imap_flags(sbx, message_id) == [{b"\\Seen", b"\\Flagged"}]

    assert graph.call("PATCH", f"me/messages/{listed['id']}", alex, json={"isRead": False}).status_code == 200
    assert imap_flags(sbx, message_id) == [{b"\\Flagged"}]

    with mb.imap_session(sbx, sbx.user) as client:  # and the other way round
        client.select_folder("INBOX")
        client.add_flags(client.search(["HEADER", "Message-ID", message_id]), [b"\\Seen"])
        client.remove_flags(client.search(["HEADER", "Message-ID", message_id]), [b"\\Flagged"])
    [again] = graph.by_message_id(alex, message_id)
    assert again["isRead"] is True and again["flag"] == {"flagStatus": "notFlagged"} and again["id"] == listed["id"]
    assert again["@odata.etag"] != listed["@odata.etag"]

    refused = graph.call("PATCH", f"me/messages/{listed['id']}", alex, json={"isRead": "yes"})
    assert_graph_error(refused, 400, "BadRequest")
    assert imap_flags(sbx, message_id) == [{b"\\Seen"}]


def test_move_gives_a_new_id_and_delete_goes_to_deleted_items(o365_sandbox, graph, alex):
    sbx = o365_sandbox
    message_id = new_id()
    smtp_send(sbx, message(message_id, "move me", to=sbx.user))
    wait_in_inbox(sbx, message_id)
    [listed] = graph.by_message_id(alex, message_id)

    moved = graph.call("POST", f"me/messages/{listed['id']}/move", alex, json={"destinationId": "archive"})
    assert moved.status_code == 201, moved.text
    new = moved.json()
    assert new["id"] != listed["id"] and new["internetMessageId"] == message_id
    assert new["parentFolderId"] == graph.folder_id(alex, "Archive")
    assert imap_flags(sbx, message_id) == [] and len(imap_flags(sbx, message_id, "Archive")) == 1
    assert_graph_error(graph.get(f"me/messages/{listed['id']}", alex), 404, "ErrorItemNotFound")
    assert graph.ok(f"me/messages/{new['id']}", alex)["subject"] == "move me"

    deleted = graph.call("DELETE", f"me/messages/{new['id']}", alex)
    assert deleted.status_code == 204 and deleted.content == b""
    assert imap_flags(sbx, message_id, "Archive") == [] and len(imap_flags(sbx, message_id, "Deleted Items")) == 1
    [trashed] = graph.by_message_id(alex, message_id, folder="deleteditems")
    assert graph.call("DELETE", f"me/messages/{trashed['id']}", alex).status_code == 204  # from Deleted Items: gone
    assert imap_flags(sbx, message_id, "Deleted Items") == []


# ====================================================================== listing: options and paging
def test_filters_orderby_search_and_paging(o365_sandbox, graph, alex, folder):
    mails = [
        message(new_id(), "Invoice 1", sender="billing@vendor.test", body="monthly invoice"),
        message(new_id(), "Invoice 2", sender="billing@vendor.test", files={"i.pdf": b"%PDF"}),
        message(new_id(), "Lunch", sender="dana@x.test", body="pizza at noon"),
        message(new_id(), "Re: Invoice 1", sender="dana@x.test"),
        message(new_id(), "Newsletter", sender="news@x.test"),
    ]
    append(o365_sandbox, folder, mails[:2], flags=(b"\\Seen",))
    append(o365_sandbox, folder, mails[2:])
    path = f"me/mailFolders/{graph.folder_id(alex, folder)}/messages"

    def subjects(**params) -> set[str]:
        return {m["subject"] for m in graph.ok(path, alex, params=params)["value"]}

    assert subjects(**{"$filter": "isRead eq true"}) == {"Invoice 1", "Invoice 2"}
    assert subjects(**{"$filter": "from/emailAddress/address eq 'dana@x.test'"}) == {"Lunch", "Re: Invoice 1"}
    assert subjects(**{"$filter": "startswith(subject,'Invoice')"}) == {"Invoice 1", "Invoice 2"}
    assert subjects(**{"$filter": "contains(subject,'invoice')"}) == {"Invoice 1", "Invoice 2", "Re: Invoice 1"}
    assert subjects(**{"$filter": "hasAttachments eq true"}) == {"Invoice 2"}
    assert subjects(**{"$filter": f"internetMessageId eq '{mails[4]['Message-ID']}'"}) == {"Newsletter"}
    assert subjects(**{"$filter": "receivedDateTime ge 2000-01-01T00:00:00Z and isRead eq false"}) == {
        "Lunch",
        "Re: Invoice 1",
        "Newsletter",
    }
    assert subjects(**{"$filter": "receivedDateTime ge 2999-01-01T00:00:00Z"}) == set()
    assert subjects(**{"$search": '"pizza"'}) == {"Lunch"}
    assert subjects(**{"$search": '"subject:invoice"'}) == {"Invoice 1", "Invoice 2", "Re: Invoice 1"}
    assert subjects(**{"$search": '"from:dana"'}) == {"Lunch", "Re: Invoice 1"}

    ordered = graph.ok(
        path,
        alex,
        params={"$filter": "receivedDateTime ge 2000-01-01T00:00:00Z", "$orderby": "receivedDateTime desc"},
    )["value"]
    stamps = [m["receivedDateTime"] for m in ordered]
    assert len(stamps) == 5 and stamps == sorted(stamps, reverse=True)

    seen, url, pages = [], path, 0
    params: dict | None = {"$top": "2", "$select": "subject"}
    while url:
        page = graph.ok(url, alex, params=params)
        params, pages = None, pages + 1
        seen += [m["id"] for m in page["value"]]
        assert all(set(m) == {"@odata.etag", "id", "subject"} for m in page["value"])
        url = page.get("@odata.nextLink")
    assert pages == 3 and len(seen) == len(set(seen)) == 5


def test_query_restrictions_answer_as_graph_does(o365_sandbox, graph, alex):
    path = "me/mailFolders/inbox/messages"
    assert_graph_error(
        graph.get(path, alex, params={"$search": '"x"', "$filter": "isRead eq true"}), 400, "SearchWithFilter"
    )
    assert_graph_error(
        graph.get(path, alex, params={"$search": '"x"', "$orderby": "receivedDateTime desc"}), 400, "SearchWithOrderBy"
    )
    assert_graph_error(
        graph.get(path, alex, params={"$filter": "isRead eq true", "$orderby": "receivedDateTime desc"}),
        400,
        "InefficientFilter",
    )
    assert_graph_error(graph.get(path, alex, params={"$filter": "colour eq 'red'"}), 400, "BadRequest")
    assert_graph_error(graph.get(path, alex, params={"$select": "subject,colour"}), 400, "BadRequest")
    assert_graph_error(graph.get("me/messages/not-an-id", alex), 400, "ErrorInvalidIdMalformed")
    assert_graph_error(graph.get("me/mailFolders/no-such-folder/messages", alex), 400, "ErrorInvalidIdMalformed")
    delta = "me/mailFolders/inbox/messages/delta"
    assert_graph_error(graph.get(delta, alex, params={"$search": '"x"'}), 400, "BadRequest")
    assert_graph_error(graph.get(delta, alex, params={"$filter": "isRead eq true"}), 400, "BadRequest")
    assert_graph_error(graph.get(delta, alex, params={"changeType": "moved"}), 400, "BadRequest")


def test_folders_and_child_folders(o365_sandbox, graph, alex, folder):
    with mb.imap_session(o365_sandbox, o365_sandbox.user) as client:
        client.create_folder(f"{folder}/Child")
    append(o365_sandbox, folder, [message(new_id(), "a"), message(new_id(), "b")], flags=(b"\\Seen",))
    append(o365_sandbox, folder, [message(new_id(), "c")])
    top = graph.ok("me/mailFolders", alex, params={"$top": "100"})["value"]
    names = {f["displayName"] for f in top}
    assert {"Inbox", "Drafts", "Sent Items", "Deleted Items", "Junk Email", "Archive", folder} <= names
    assert f"{folder}/Child" not in names and "Child" not in names
    [mine] = [f for f in top if f["displayName"] == folder]
    assert (mine["totalItemCount"], mine["unreadItemCount"], mine["childFolderCount"]) == (3, 1, 1)
    [child] = graph.ok(f"me/mailFolders/{mine['id']}/childFolders", alex)["value"]
    assert child["displayName"] == "Child" and child["parentFolderId"] == mine["id"]
    assert graph.ok(f"me/mailFolders/{child['id']}", alex)["id"] == child["id"]
    assert graph.ok("me/mailFolders/SentItems", alex)["displayName"] == "Sent Items"
    paged = graph.ok("me/mailFolders", alex, params={"$top": "2"})
    assert len(paged["value"]) == 2 and "@odata.nextLink" in paged


# ====================================================================== delta
def test_delta_rounds_report_created_updated_and_deleted(o365_sandbox, graph, alex, folder):
    sbx = o365_sandbox
    first = [message(new_id(), f"m{n}") for n in range(5)]
    append(sbx, folder, first)
    start = f"me/mailFolders/{graph.folder_id(alex, folder)}/messages/delta?$select=subject,isRead"
    created, delta_link, pages = graph.delta_round(f"{graph.base}/{start}", alex, page_size=2)
    assert pages == 3 and sorted(m["subject"] for m in created) == [f"m{n}" for n in range(5)]
    assert all(set(m) == {"@odata.type", "@odata.etag", "id", "subject", "isRead"} for m in created)
    ids = {m["subject"]: m["id"] for m in created}

    unchanged, delta_link, _ = graph.delta_round(delta_link, alex)
    assert unchanged == []

    append(sbx, folder, [message(new_id(), "m5")])
    with mb.imap_session(sbx, sbx.user) as client:
        client.select_folder(folder)
        client.add_flags(client.search(["SUBJECT", "m1"]), [b"\\Seen"])
        client.delete_messages(client.search(["SUBJECT", "m2"]))
        client.expunge()
    changed, delta_link, _ = graph.delta_round(delta_link, alex, page_size=1)
    removed = [c["id"] for c in changed if "@removed" in c]
    present = {c["subject"]: c for c in changed if "@removed" not in c}
    assert removed == [ids["m2"]] and [c["@removed"] for c in changed if "@removed" in c] == [{"reason": "deleted"}]
    assert set(present) == {"m1", "m5"} and present["m1"]["isRead"] is True and present["m1"]["id"] == ids["m1"]

    again, delta_link, _ = graph.delta_round(delta_link, alex)
    assert again == []

    # A retried page URL answers the same page (nothing lost when an answer is).
    append(sbx, folder, [message(new_id(), "m6"), message(new_id(), "m7")])
    page = graph.ok(delta_link, alex, headers={"Prefer": "odata.maxpagesize=1"})
    retried = graph.ok(delta_link, alex, headers={"Prefer": "odata.maxpagesize=1"})
    assert [m["subject"] for m in page["value"]] == [m["subject"] for m in retried["value"]]
    rest = graph.ok(page["@odata.nextLink"], alex, headers={"Prefer": "odata.maxpagesize=1"})
    assert {page["value"][0]["subject"], rest["value"][0]["subject"]} == {"m6", "m7"}


def test_delta_change_type_and_received_bound(o365_sandbox, graph, alex, folder):
    sbx = o365_sandbox
    append(sbx, folder, [message(new_id(), "old-1"), message(new_id(), "old-2")])
    base = f"{graph.base}/me/mailFolders/{graph.folder_id(alex, folder)}/messages/delta"
    initial, created_link, _ = graph.delta_round(f"{base}?changeType=created", alex)
    assert len(initial) == 2  # the first round has every message whatever the change type
    future, future_link, _ = graph.delta_round(f"{base}?$filter=receivedDateTime ge 2999-01-01T00:00:00Z", alex)
    assert future == []

    append(sbx, folder, [message(new_id(), "new-1")])
    with mb.imap_session(sbx, sbx.user) as client:
        client.select_folder(folder)
        client.add_flags(client.search(["SUBJECT", "old-1"]), [b"\\Seen"])
        client.delete_messages(client.search(["SUBJECT", "old-2"]))
        client.expunge()
    only_created, _, _ = graph.delta_round(created_link, alex)
    assert [m["subject"] for m in only_created] == ["new-1"]
    assert graph.delta_round(future_link, alex)[0] == []


def test_delta_after_deliveries_to_the_inbox(o365_sandbox, graph, alex):
    """The watermark a Graph sensor keeps: a deltaLink bounded by receivedDateTime, then new SMTP mail."""
    sbx = o365_sandbox
    bound = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    url = f"{graph.base}/me/mailFolders/inbox/messages/delta?$filter=receivedDateTime ge {bound}&$select=internetMessageId"
    _, delta_link, _ = graph.delta_round(url, alex)
    sent = [new_id() for _ in range(3)]
    for message_id in sent:
        smtp_send(sbx, message(message_id, "delivered", to=sbx.user))
    for message_id in sent:
        wait_in_inbox(sbx, message_id)
    changes, delta_link, _ = graph.delta_round(delta_link, alex, page_size=2)
    mine = [c["internetMessageId"] for c in changes if c.get("internetMessageId") in sent]
    assert sorted(mine) == sorted(sent)
    later, _, _ = graph.delta_round(delta_link, alex)
    assert [c for c in later if c.get("internetMessageId") in sent] == []


def test_delta_token_survives_a_restart_and_expires_on_demand(o365_sandbox, o365_admin, graph, alex, folder):
    sbx = o365_sandbox
    append(sbx, folder, [message(new_id(), "before")])
    start = f"{graph.base}/me/mailFolders/{graph.folder_id(alex, folder)}/messages/delta?$select=subject"
    _, delta_link, _ = graph.delta_round(start, alex)
    append(sbx, folder, [message(new_id(), "during restart")])
    Sandbox(sbx.state_dir).restart_graph()
    changes, delta_link, _ = graph.delta_round(delta_link, alex)
    assert [c["subject"] for c in changes] == ["during restart"]

    assert o365_admin.graph_expire_delta(sbx.user) >= 1
    expired = graph.get(delta_link, alex)
    assert_graph_error(expired, 410, "syncStateNotFound")
    assert_graph_error(graph.get(f"{start.split('?')[0]}?$skiptoken=made-up", alex), 410, "syncStateNotFound")
    o365_admin.graph_settings(delta_expired_status=400)
    assert_graph_error(graph.get(delta_link, alex), 400, "syncStateNotFound")

    _, fresh_link, _ = graph.delta_round(start, alex)  # a new initial round works
    assert o365_admin.graph_expire_delta(sbx.user, how="resyncRequired") >= 1
    reset = graph.get(fresh_link, alex)
    assert_graph_error(reset, 410, "resyncRequired")
    resynced, _, _ = graph.delta_round(reset.headers["Location"], alex)
    assert sorted(c["subject"] for c in resynced) == ["before", "during restart"]
    assert_graph_error(graph.get(f"{start.split('?')[0]}?$deltatoken=made-up", alex), 400, "syncStateNotFound")


def test_recreated_folder_is_a_new_folder_and_its_old_ids_are_gone(o365_sandbox, graph, alex, folder):
    sbx = o365_sandbox
    append(sbx, folder, [message(new_id(), "first life")])
    old_folder = graph.folder_id(alex, folder)
    [old] = graph.ok(f"me/mailFolders/{old_folder}/messages", alex)["value"]
    _, delta_link, _ = graph.delta_round(f"{graph.base}/me/mailFolders/{old_folder}/messages/delta", alex)
    mb.recreate_folder(sbx, sbx.user, folder)
    append(sbx, folder, [message(new_id(), "second life")])
    assert graph.folder_id(alex, folder) != old_folder
    assert_graph_error(graph.get(delta_link, alex), 404, "ErrorItemNotFound")
    assert_graph_error(graph.get(f"me/messages/{old['id']}", alex), 404, "ErrorItemNotFound")
    fresh, _, _ = graph.delta_round(f"{graph.base}/me/mailFolders/{graph.folder_id(alex, folder)}/messages/delta", alex)
    assert [m["subject"] for m in fresh] == ["second life"]


# ====================================================================== who may read, throttling, faults
def test_app_only_and_shared_mailbox_reading(o365_sandbox, o365_admin, graph, alex):
    sbx = o365_sandbox
    message_id = new_id()
    smtp_send(sbx, message(message_id, "for the second user", to=sbx.second_user))
    deadline = time.monotonic() + 60
    app = msal.ConfidentialClientApplication(
        sbx.app_client_id,
        client_credential=sbx.app_client_secret,
        authority=sbx.authority,
        instance_discovery=False,
        http_client=tls_session(sbx.ca_file),
    )
    app_only = app.acquire_token_for_client([f"{GRAPH}/.default"])["access_token"]
    while not graph.by_message_id(app_only, message_id, who=f"users/{sbx.second_user}"):
        assert time.monotonic() < deadline, "the second user's mail never showed up"
        time.sleep(0.3)
    # A delegated token reads another user's mailbox only with Full Access (alex has none on it).
    refused = graph.get(f"users/{sbx.second_user}/mailFolders/inbox/messages", alex)
    assert_graph_error(refused, 403, "ErrorAccessDenied")
    assert graph.get(f"users/{sbx.shared_mailbox}/mailFolders/inbox/messages", alex).status_code == 200
    o365_admin.graph_access_policy(sbx.app_client_id, [sbx.user])
    assert_graph_error(graph.get(f"users/{sbx.second_user}/messages", app_only), 403, "ErrorAccessDenied")
    # An ID of one mailbox is unknown in another.
    o365_admin.graph_access_policy(sbx.app_client_id, None)
    [theirs] = graph.by_message_id(app_only, message_id, who=f"users/{sbx.second_user}")
    assert_graph_error(graph.get(f"me/messages/{theirs['id']}", alex), 404, "ErrorItemNotFound")


def test_reading_is_throttled_counted_and_takes_faults(o365_sandbox, o365_admin, graph, alex, folder):
    sbx = o365_sandbox
    append(sbx, folder, [message(new_id(), "only one")])
    delta = f"me/mailFolders/{graph.folder_id(alex, folder)}/messages/delta"
    o365_admin.graph_reset_counters()
    o365_admin.graph_fault(operation="messagesDelta", status=503, retry_after=3)
    failed = graph.get(delta, alex)
    assert_graph_error(failed, 503, "serviceNotAvailable")
    assert failed.headers["Retry-After"] == "3"
    o365_admin.graph_throttle(operation="getMessage", retry_after=2)
    [listed] = graph.ok(f"me/mailFolders/{graph.folder_id(alex, folder)}/messages", alex)["value"]
    throttled = graph.get(f"me/messages/{listed['id']}", alex)
    assert_graph_error(throttled, 429, "ApplicationThrottled")
    assert graph.get(f"me/messages/{listed['id']}", alex).status_code == 200
    changes, _, _ = graph.delta_round(f"{graph.base}/{delta}", alex)
    assert [c["subject"] for c in changes] == ["only one"]
    by_operation = o365_admin.graph_counters(sbx.user)["by_operation"]
    assert by_operation["messagesDelta"] == 2 and by_operation["getMessage"] == 2

    o365_admin.graph_settings(requests_per_window=3)
    o365_admin.graph_reset_counters()
    answers = [graph.get(f"me/messages/{listed['id']}", alex).status_code for _ in range(5)]
    assert answers == [200, 200, 200, 429, 429]
