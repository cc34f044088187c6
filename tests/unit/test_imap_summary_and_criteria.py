"""Summaries from FETCH data and SEARCH compilation: pure functions, hostile input."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from collections import namedtuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imapclient.imapclient import _normalise_search_criteria

from airflow_provider_o365mail.core.criteria import CriteriaError, MailCriteria
from airflow_provider_o365mail.core.watermark import FolderWatermark
from airflow_provider_o365mail.imap.search import search_keys, tokenize_raw_criteria
from airflow_provider_o365mail.imap.summary import attachments_of, summarize
from airflow_provider_o365mail.imap.watch import CheckResult, WatchSpec, _capped

Envelope = namedtuple("Envelope", "date subject from_ sender reply_to to cc bcc in_reply_to message_id")
Address = namedtuple("Address", "name route mailbox host")

atoms = st.one_of(st.none(), st.integers(-5, 10**9), st.binary(max_size=40), st.text(max_size=20))
structures = st.recursive(
    atoms, lambda children: st.lists(children, max_size=12).map(tuple) | st.lists(children, max_size=5), max_leaves=60
)
addresses = st.builds(Address, atoms, atoms, atoms, atoms)
envelopes = st.one_of(
    st.none(),
    structures,
    st.builds(
        Envelope,
        st.one_of(st.none(), st.datetimes(timezones=st.none() | st.just(dt.UTC))),
        atoms,
        st.one_of(st.none(), st.lists(st.one_of(addresses, atoms), max_size=3).map(tuple)),
        atoms,
        atoms,
        st.one_of(st.none(), st.lists(st.one_of(addresses, atoms), max_size=3).map(tuple), atoms),
        st.one_of(st.none(), st.lists(addresses, max_size=3).map(tuple)),
        atoms,
        atoms,
        atoms,
    ),
)


@settings(max_examples=400, deadline=None)
@given(envelope=envelopes, body=structures, size=atoms, flags=structures, internaldate=atoms)
def test_summary_never_crashes_and_is_json(envelope, body, size, flags, internaldate):
    data = {b"ENVELOPE": envelope, b"BODYSTRUCTURE": body, b"RFC822.SIZE": size, b"FLAGS": flags}
    data[b"INTERNALDATE"] = internaldate
    summary = summarize("INBOX", 7, 42, data)
    json.dumps(summary)
    assert summary["uid"] == 42 and summary["uidvalidity"] == 7 and summary["folder"] == "INBOX"


def test_attachment_names_rfc2231_and_rfc2047():
    body = (
        [
            (b"text", b"plain", (b"charset", b"utf-8"), None, None, b"7bit", 10, 1, None, None, None, None),
            (
                b"application",
                b"pdf",
                (b"name", b"=?utf-8?q?Rechnung_M=C3=A4rz.pdf?="),
                None,
                None,
                b"base64",
                1000,
                None,
                (b"attachment", (b"filename*0*", b"utf-8''Rechnung%20M", b"filename*1*", b"%C3%A4rz.pdf")),
                None,
                None,
            ),
            (
                b"image",
                b"png",
                None,
                b"<logo>",
                None,
                b"base64",
                50,
                None,
                (b"inline", (b"filename", b"logo.png")),
                None,
                None,
            ),
        ],
        b"mixed",
        (b"boundary", b"x"),
        None,
        None,
        None,
    )
    found = attachments_of(body)
    assert [(a["name"], a["section"], a["inline"]) for a in found] == [
        ("Rechnung März.pdf", "2", False),
        ("logo.png", "3", True),
    ]


def test_search_keys_quote_every_value_as_one_argument():
    criteria = MailCriteria.build(
        sender=["a@x.test", 'evil" OR ALL "'],
        recipient="me@x.test",
        subject='Q3 "final" report',
        since="2026-01-02",
        unseen=True,
        header={"X-Report-Id": "42"},
    )
    wire = b" ".join(_normalise_search_criteria(search_keys(criteria), "UTF-8"))
    assert wire == (
        b'OR (FROM a@x.test) (FROM "evil\\" OR ALL \\"") OR TO me@x.test CC me@x.test '
        b'SUBJECT "Q3 \\"final\\" report" SINCE 02-Jan-2026 UNSEEN HEADER X-Report-Id 42'
    )


@pytest.mark.parametrize("value", ["a\r\nb", "a\nb", "x\0"])
def test_line_breaks_in_values_are_refused(value):
    with pytest.raises(CriteriaError, match="line break"):
        search_keys(MailCriteria.build(subject=value))


def test_raw_criteria_tokenizer():
    assert tokenize_raw_criteria('NOT DELETED (OR SUBJECT "a \\"b\\"" FLAGGED)') == [
        b"NOT",
        b"DELETED",
        [b"OR", b"SUBJECT", b'a "b"', b"FLAGGED"],
    ]
    for broken in ["(UNSEEN", "UNSEEN)", 'SUBJECT "open']:
        with pytest.raises(CriteriaError):
            tokenize_raw_criteria(broken)


def test_spec_round_trips_through_json():
    spec = WatchSpec.build(
        ["INBOX", "Übersicht"],
        new_only=True,
        post_action="move",
        move_to="Done",
        sender=["a", "b"],
        since=dt.date(2026, 1, 2),
    )
    assert WatchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(CriteriaError):
        WatchSpec.build("INBOX", post_action="move")
    with pytest.raises(CriteriaError):
        WatchSpec.build("INBOX", post_action="archive")


def test_cap_keeps_the_oldest_and_holds_the_watermark_back():
    messages = [{"folder": "INBOX", "uid": uid} for uid in (10, 11, 12, 13)]
    result = _capped(messages, {"INBOX": {"uidvalidity": 1, "high_uid": 20, "uidnext": 21}}, 2)
    assert [m["uid"] for m in result.messages] == [10, 11]
    assert result.scanned["INBOX"]["high_uid"] == 11
    assert CheckResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_watermark_keeps_recent_message_ids_and_resets_on_uidvalidity_change():
    mark = FolderWatermark(uidvalidity=1, last_uid=5, seen_keys=["<a>"])
    same = mark.advanced(1, 9, ["<b>", "<a>"])
    assert same.last_uid == 9 and same.seen_keys == ["<b>", "<a>"]
    moved = same.advanced(2, 3, ["<c>"])
    assert moved.uidvalidity == 2 and moved.last_uid == 3 and moved.seen_keys[-1] == "<c>"
    assert len(FolderWatermark(1, 0).advanced(1, 1, [f"<{i}>" for i in range(5000)]).seen_keys) == 2000


def test_summary_from_a_partial_header_matches_what_envelope_gives():
    header = (
        b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@supplier.example>\r\n"
        b'To: ap@contoso.com, "Boss, The" <boss@contoso.com>\r\n'
        b"Cc: team@contoso.com\r\n"
        b"Subject: =?utf-8?q?Rechnung_f=C3=BCr?= November\r\n"
        b"Date: Tue, 03 Nov 2026 10:00:00 +0100\r\n"
        b"Message-ID: <inv-7@supplier.example>\r\n\r\n"
    )
    summary = summarize("INBOX", 3, 7, {b"BODY[HEADER]<0>": header, b"RFC822.SIZE": 1234, b"FLAGS": (b"\\Seen",)})
    envelope_from = summarize(
        "INBOX",
        3,
        7,
        {
            b"ENVELOPE": Envelope(
                None,
                b"",
                (Address("Jürgen Müller".encode(), None, b"juergen", b"supplier.example"),),
                None,
                None,
                None,
                None,
                None,
                None,
                b"",
            )
        },
    )["from"]
    assert summary["from"] == envelope_from == email.utils.formataddr(("Jürgen Müller", "juergen@supplier.example"))
    assert summary["to"] == ["ap@contoso.com", '"Boss, The" <boss@contoso.com>']
    assert summary["cc"] == ["team@contoso.com"]
    assert summary["subject"] == "Rechnung für November"
    assert summary["message_id"] == "<inv-7@supplier.example>"
    assert summary["date"] == "2026-11-03T10:00:00+01:00"
    assert summary["size"] == 1234 and summary["flags"] == ["\\Seen"]


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=2000))
def test_summary_from_any_header_bytes_never_raises(raw):
    summary = summarize("INBOX", 1, 1, {b"BODY[HEADER]<0>": raw})
    json.dumps(summary)


LEAF = (b"application", b"pdf", (b"name", b"x.pdf"), None, None, b"base64", 10, None, (b"attachment", None), None)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(0, 12_000), depth=st.integers(0, 3_000))
def test_summary_of_huge_and_deep_structures_never_raises(width, depth):
    body: object = ([LEAF] * width, b"mixed")
    for _ in range(depth):
        body = ([body], b"mixed")
    summary = summarize("INBOX", 1, 1, {b"BODYSTRUCTURE": body, b"BODY[HEADER]<0>": b"Subject: s\r\n\r\n"})
    json.dumps(summary)
    assert summary["subject"] == "s"
    if depth < 500:  # what a Python parser can walk; deeper structures report no attachments, never fail
        assert len(summary["attachments"]) == width


def _raw(*items: str) -> list[bytes]:
    return [item.encode() for item in items]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # Both forms, as most mailers write them: the RFC 2231 one wins over the ASCII fallback.
        (_raw("filename", "ete.pdf", "filename*", "utf-8''%C3%A9t%C3%A9.pdf"), "été.pdf"),
        (_raw("filename*", "utf-8''été.pdf"), "été.pdf"),  # raw 8-bit text where percent-encoding belongs
        (_raw("filename*", "''%C3%A9t%C3%A9.pdf"), "été.pdf"),  # empty charset: UTF-8, not latin-1
        (_raw("filename*", "x-bogus''%C3%A9t%C3%A9.pdf"), "été.pdf"),  # unknown charset
        (_raw("filename*0", "O'Brien's ", "filename*1*", "%E2%82%AC.pdf"), "O'Brien's €.pdf"),  # plain section 0
        (_raw("filename*0*", "utf-8''%C3%A9t", "filename*1*", "%C3%A9.pdf"), "été.pdf"),
    ],
)
def test_rfc2231_parameters_as_real_mailers_write_them(params, expected):
    # email.utils.decode_params/collapse_rfc2231_value gave 'ete.pdf', mojibake or nothing for these.
    from airflow_provider_o365mail.imap.summary import _params

    assert _params(params)["filename"] == expected
