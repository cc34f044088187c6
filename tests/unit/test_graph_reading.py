"""The Graph stand-in's reading rules without Dovecot: IDs, OData options, MIME views, delta tokens, routes."""

from __future__ import annotations

import json
from email.message import EmailMessage

import pytest

from airflow_provider_o365mail.testing.graph import api, mailview, odata
from airflow_provider_o365mail.testing.graph.delta import EXPIRED, RESET, DeltaStore, Token, changes
from airflow_provider_o365mail.testing.graph.errors import GraphError
from airflow_provider_o365mail.testing.graph.ids import IdCodec, MessageRef

GUID = "f1f5570b6c52146bc37d000083ecc375"


def code_of(call) -> tuple[int, str]:
    with pytest.raises(GraphError) as caught:
        call()
    return caught.value.status, caught.value.code


# ---------------------------------------------------------------------- IDs
def test_message_ids_round_trip_and_are_bound_to_the_mailbox_and_the_secret():
    codec = IdCodec("secret")
    ref = MessageRef(GUID, 1796493932, 42)
    message_id = codec.message_id("Alex@x.test", ref)
    assert message_id.startswith("AAMkAG") and str(42) not in message_id[6:12]
    assert codec.message_ref("alex@x.test", message_id) == ref
    assert IdCodec("secret").message_id("alex@x.test", ref) == message_id  # stable across restarts
    assert codec.message_id("alex@x.test", MessageRef(GUID, 1796493932, 43)) != message_id
    assert codec.message_id("alex@x.test", MessageRef(GUID, 1796493933, 42)) != message_id  # new UIDVALIDITY
    assert code_of(lambda: codec.message_ref("blair@x.test", message_id)) == (404, "ErrorItemNotFound")
    assert code_of(lambda: IdCodec("other").message_ref("alex@x.test", message_id)) == (404, "ErrorItemNotFound")
    tampered = message_id[:-6] + ("A" if message_id[-6] != "A" else "B") + message_id[-5:]
    assert code_of(lambda: codec.message_ref("alex@x.test", tampered)) == (404, "ErrorItemNotFound")
    for garbage in ("hello", "AAMkAG!!", "AAMkAG" + "QUJD"):
        assert code_of(lambda g=garbage: codec.message_ref("alex@x.test", g)) == (400, "ErrorInvalidIdMalformed")


def test_folder_ids():
    codec = IdCodec("secret")
    folder_id = codec.folder_id("alex@x.test", GUID)
    assert folder_id.startswith("AQMkAG") and codec.folder_guid("alex@x.test", folder_id) == GUID
    assert codec.folder_guid("blair@x.test", folder_id) is None
    assert codec.folder_guid("alex@x.test", "inbox") is None
    assert codec.folder_guid("alex@x.test", codec.message_id("alex@x.test", MessageRef(GUID, 1, 1))) is None


# ---------------------------------------------------------------------- $filter, $orderby, $search, $select
MESSAGE = {
    "receivedDateTime": "2026-03-01T10:00:00Z",
    "sentDateTime": "2026-03-01T09:59:00Z",
    "isRead": False,
    "hasAttachments": True,
    "subject": "Invoice 42 for March",
    "internetMessageId": "<abc@x.test>",
    "importance": "normal",
    "from": {"emailAddress": {"name": "Billing", "address": "Billing@Vendor.test"}},
    "flag": {"flagStatus": "flagged"},
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("receivedDateTime ge 2026-03-01T10:00:00Z", True),
        ("receivedDateTime gt 2026-03-01T10:00:00Z", False),
        ("receivedDateTime lt 2026-03-02T00:00:00+01:00", True),
        ("isRead eq false", True),
        ("isRead eq true", False),
        ("hasAttachments eq true and isRead eq false", True),
        ("from/emailAddress/address eq 'billing@vendor.test'", True),
        ("from/emailAddress/address eq 'someone@else.test'", False),
        ("subject eq 'invoice 42 for march'", True),
        ("startswith(subject,'Invoice')", True),
        ("startswith(subject,'March')", False),
        ("contains(subject,'42 for')", True),
        ("internetMessageId eq '<abc@x.test>'", True),
        ("internetMessageId eq '<ab''c@x.test>'", False),
        ("isRead eq true or (hasAttachments eq true and not (importance eq 'high'))", True),
        ("flag/flagStatus eq 'flagged'", True),
        ("IsRead Eq false", True),
    ],
)
def test_filter_subset(expression, expected):
    assert odata.parse_filter(expression).matches(MESSAGE) is expected


@pytest.mark.parametrize(
    ("expression", "status", "code"),
    [
        ("color eq 'red'", 400, "BadRequest"),
        ("isRead eq", 400, "BadRequest"),
        ("isRead === true", 400, "BadRequest"),
        ("(isRead eq true", 400, "BadRequest"),
        ("isRead eq 'yes'", 400, "BadRequest"),
        ("receivedDateTime ge 'yesterday'", 400, "BadRequest"),
        ("startswith(isRead,'t')", 400, "BadRequest"),
        ("endswith(subject,'x')", 501, "NotImplemented"),
        ("toRecipients/any(r: r/emailAddress/address eq 'a@b.c')", 501, "NotImplemented"),
    ],
)
def test_filter_refusals(expression, status, code):
    assert code_of(lambda: odata.parse_filter(expression)) == (status, code)


def test_orderby_must_lead_the_filter_in_the_same_order():
    filter_ = odata.parse_filter("receivedDateTime ge 2026-01-01T00:00:00Z and isRead eq false")
    odata.check_filter_and_orderby(filter_, odata.parse_orderby("receivedDateTime desc"))
    for orderby in ("isRead", "subject", "isRead,receivedDateTime desc"):
        assert code_of(lambda o=orderby: odata.check_filter_and_orderby(filter_, odata.parse_orderby(o))) == (
            400,
            "InefficientFilter",
        )
    assert code_of(lambda: odata.parse_orderby("receivedDateTime sideways")) == (400, "BadRequest")
    rows = [{"receivedDateTime": "2026-01-02T00:00:00Z"}, {"receivedDateTime": "2026-01-03T00:00:00Z"}]
    assert sorted(rows, key=odata.sort_key(odata.parse_orderby("receivedDateTime desc")))[0] is rows[1]
    assert sorted(rows, key=odata.sort_key(odata.parse_orderby("receivedDateTime")))[0] is rows[0]


def test_search_words_fields_and_or():
    texts = {"subject": "Quarterly report", "body": "The pizza party is on Friday", "from": "Dana danas@x.test"}
    assert odata.parse_search('"pizza"').matches(texts)
    assert odata.parse_search('"piz"').matches(texts)  # a word starting with the term
    assert not odata.parse_search('"izza"').matches(texts)  # not inside a word
    assert odata.parse_search('"subject:quarterly"').matches(texts)
    assert not odata.parse_search('"subject:pizza"').matches(texts)
    assert odata.parse_search('"from:danas"').matches(texts)
    assert not odata.parse_search('"pizza report missing"').matches(texts)  # terms are ANDed
    assert odata.parse_search('"missing OR pizza"').matches(texts)
    assert code_of(lambda: odata.parse_search('""')) == (400, "BadRequest")
    assert code_of(lambda: odata.parse_search('"kind:voicemail"')) == (501, "NotImplemented")


def test_select():
    assert odata.parse_select("subject, isRead,from") == ["subject", "isRead", "from"]
    assert odata.parse_select("") is None
    assert code_of(lambda: odata.parse_select("subject,colour")) == (400, "BadRequest")


# ---------------------------------------------------------------------- MIME to Graph properties
def _mixed() -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@x.test", "b@x.test", "report"
    message.set_content("plain text  body\nsecond line")
    message.add_alternative("<p>html <b>body</b></p>", subtype="html")
    message.add_attachment(b"\x00\x01\x02", maintype="application", subtype="octet-stream", filename="data.bin")
    inner = EmailMessage()
    inner["Subject"], inner["Message-ID"] = "forwarded", "<inner@x.test>"
    inner.set_content("inner")
    message.add_attachment(inner)
    return message.as_bytes()


def test_view_bodies_preview_and_attachments():
    view = mailview.view(_mixed())
    assert view.body() == {"contentType": "html", "content": "<p>html <b>body</b></p>\n"}
    assert view.body("text")["content"].startswith("plain text  body")
    assert view.preview() == "plain text body second line"
    files = [p for p in view.attachments if not p.is_item]
    items = [p for p in view.attachments if p.is_item]
    assert [(p.name, p.data) for p in files] == [("data.bin", b"\x00\x01\x02")]
    assert [p.name for p in items] == ["forwarded"] and b"Message-ID: <inner@x.test>" in items[0].data
    assert view.has_attachments
    as_json = mailview.attachment_json(files[0], "AAMkAGx", with_content=True, modified="t")
    assert as_json["@odata.type"] == "#microsoft.graph.fileAttachment" and as_json["contentBytes"] == "AAEC"
    item_json = mailview.attachment_json(items[0], "AAMkAGx", with_content=True, modified="t")
    assert item_json["@odata.type"] == "#microsoft.graph.itemAttachment" and "contentBytes" not in item_json
    assert mailview.attachment_id("AAMkAGx", 0) != mailview.attachment_id("AAMkAGx", 1)
    assert mailview.attachment_id("AAMkAGx", 0) != mailview.attachment_id("AAMkAGy", 0)


def test_plain_text_becomes_html_and_inline_parts_do_not_count_as_attachments():
    message = EmailMessage()
    message["Subject"] = "s"
    message.set_content("a < b\nline")
    message.add_related(b"png", maintype="image", subtype="png", cid="<logo>", disposition="inline")
    view = mailview.view(message.as_bytes())
    assert view.body()["content"] == "<html><body>a &lt; b<br>\r\nline<br>\r\n</body></html>"
    assert [p.is_inline for p in view.attachments] == [True] and not view.has_attachments
    html_only = EmailMessage()
    html_only.set_content("<div>one</div><div>two &amp; three</div>", subtype="html")
    assert mailview.view(html_only.as_bytes()).body("text")["content"].split() == ["one", "two", "&", "three"]


# ---------------------------------------------------------------------- delta state
def test_changes_between_states():
    assert changes({}, {1: 5, 2: 6}) == [(1, "created"), (2, "created")]
    assert changes({1: 5, 2: 6, 3: 7}, {1: 5, 2: 9, 4: 10}) == [(4, "created"), (2, "updated"), (3, "deleted")]
    assert changes({1: 5}, {1: 5}) == []


def _token(value: str, mailbox: str = "alex@x.test", created: float = 1.0) -> Token:
    return Token(value, "delta", mailbox, GUID, 7, {"changeType": "created"}, {"1": 5}, created=created)


def test_tokens_survive_a_new_store_on_the_same_directory(tmp_path):
    store = DeltaStore(tmp_path / "delta")
    store.save(_token("tok-1"))
    again = DeltaStore(tmp_path / "delta")
    loaded = again.load("tok-1")
    assert loaded is not None and loaded.state == {"1": 5} and loaded.params == {"changeType": "created"}
    assert again.load("tok-2") is None and again.load("") is None and again.load("../../etc/passwd") is None
    assert again.count() == {"alex@x.test": 1}


def test_oldest_tokens_are_dropped_beyond_the_capacity_per_mailbox(tmp_path):
    store = DeltaStore(tmp_path, capacity=2)
    for n in range(3):
        store.save(_token(f"a{n}", created=float(n)))
    store.save(_token("b0", mailbox="blair@x.test", created=0.0))
    assert store.load("a0") is None and store.load("a1") is not None and store.load("a2") is not None
    assert store.load("b0") is not None  # another mailbox's cache
    assert DeltaStore(tmp_path, capacity=2).count() == {"alex@x.test": 2, "blair@x.test": 1}


def test_expire_marks_tokens_of_one_mailbox_or_all(tmp_path):
    store = DeltaStore(tmp_path)
    store.save(_token("a"))
    store.save(_token("b", mailbox="blair@x.test"))
    assert store.expire("alex@x.test") == 1
    assert store.load("a").expired == EXPIRED and store.load("b").expired is None  # type: ignore[union-attr]
    assert store.expire(None, RESET) == 2
    assert {store.load(v).expired for v in ("a", "b")} == {RESET}  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        store.expire(None, "whatever")
    assert json.loads((tmp_path / "a.json").read_text())["expired"] == RESET


# ---------------------------------------------------------------------- routes and Prefer
@pytest.mark.parametrize(
    ("method", "path", "operation"),
    [
        ("GET", "me/mailFolders/inbox/messages/delta", "messagesDelta"),
        ("GET", "users/a@x.test/mailFolders/AQMkAGx/childFolders/AQMkAGy/messages/delta", "messagesDelta"),
        ("GET", "me/mailFolders", "listMailFolders"),
        ("GET", "me/mailFolders/inbox", "getMailFolder"),
        ("GET", "me/mailFolders/inbox/childFolders", "listChildFolders"),
        ("GET", "me/messages", "listMessages"),
        ("GET", "me/MailFolders/Inbox/Messages", "listMessages"),
        ("GET", "me/messages/AAMkAGx=", "getMessage"),
        ("GET", "me/mailFolders/inbox/messages/AAMkAGx=", "getMessage"),
        ("PATCH", "me/messages/AAMkAGx=", "updateMessage"),
        ("DELETE", "users/a@x.test/messages/AAMkAGx=", "deleteMessage"),
        ("GET", "me/messages/AAMkAGx=/$value", "getMessageValue"),
        ("POST", "me/messages/AAMkAGx=/move", "moveMessage"),
        ("GET", "me/messages/AAMkAGx=/attachments", "listAttachments"),
        ("POST", "me/messages/AAMkAGx=/attachments", "addAttachment"),
        ("GET", "me/messages/AAMkAGx=/attachments/AAMkAGa=", "getAttachment"),
        ("GET", "me/messages/AAMkAGx=/attachments/AAMkAGa=/$value", "getAttachmentValue"),
    ],
)
def test_routes(method, path, operation):
    assert api.match(method, path)[0] == operation


def test_wrong_method_on_a_reading_path_is_405():
    assert code_of(lambda: api.match("PUT", "me/messages/AAMkAGx=")) == (405, "Request_BadRequest")


def test_prefer_header():
    assert api.preferences(None) == ("html", None)
    assert api.preferences('outlook.body-content-type="text", odata.maxpagesize=2') == ("text", 2)
    assert api.preferences("odata.maxpagesize=0, outlook.body-content-type=rtf") == ("html", None)


# ---------------------------------------------------------------------- permissions of the reading operations
def test_reading_permissions(tmp_path):
    from airflow_provider_o365mail.testing.graph.service import GraphService
    from airflow_provider_o365mail.testing.graph.settings import GraphSettings
    from airflow_provider_o365mail.testing.graph.tenant import MailboxSettings, Tenant
    from airflow_provider_o365mail.testing.graph.tokens import Caller

    users = {"alex@x.test": {"oid": "o1"}, "shared@x.test": {"oid": "o2"}}
    (tmp_path / "directory.json").write_text(json.dumps({"users": users}))
    seed = {"alex@x.test": MailboxSettings(), "shared@x.test": MailboxSettings(full_access=["alex@x.test"])}
    tenant = Tenant(tmp_path / "directory.json", "x.test", seed)
    service = GraphService(tenant, None, None, None, GraphSettings(), tenant_id="t", id_domain="d")  # type: ignore[arg-type]
    alex, shared = tenant.resolve("alex@x.test"), tenant.resolve("shared@x.test")

    def allowed(caller: Caller, mailbox, operation: str) -> bool:
        try:
            service.authorize(caller, mailbox, operation)
        except GraphError as error:
            assert (error.status, error.code) == (403, "ErrorAccessDenied")
            return False
        return True

    basic = Caller("app", True, frozenset({"Mail.ReadBasic"}), upn="alex@x.test")
    read = Caller("app", True, frozenset({"Mail.Read"}), upn="alex@x.test")
    read_shared = Caller("app", True, frozenset({"Mail.Read.Shared"}), upn="alex@x.test")
    app_basic = Caller("app", False, frozenset({"Mail.ReadBasic.All"}))
    app_write = Caller("app", False, frozenset({"Mail.ReadWrite"}))
    for operation in ("listMailFolders", "getMailFolder", "listMessages", "getMessage", "messagesDelta"):
        assert allowed(basic, alex, operation) and allowed(app_basic, shared, operation)
        assert not allowed(basic, shared, operation)  # no .Shared scope
    for operation in ("getMessageValue", "listAttachments", "getAttachment", "getAttachmentValue"):
        assert not allowed(basic, alex, operation) and not allowed(app_basic, alex, operation)
        assert allowed(read, alex, operation) and allowed(read_shared, shared, operation)
    for operation in ("updateMessage", "moveMessage", "deleteMessage"):
        assert not allowed(read, alex, operation) and not allowed(read_shared, shared, operation)
        assert allowed(app_write, shared, operation)
