"""Message composition: addresses, header injection, MIME structure (no network)."""

from __future__ import annotations

import email
from email import policy

import pytest

from airflow_provider_o365mail.core.addresses import parse_addresses
from airflow_provider_o365mail.core.compose import compose_message
from airflow_provider_o365mail.exceptions import MessageCompositionError

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100"
    "18dd8db00000000049454e44ae426082"
)


def parsed(outgoing):
    return email.message_from_bytes(outgoing.as_bytes(), policy=policy.default)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a@x.test", ["a@x.test"]),
        ("a@x.test, b@y.test", ["a@x.test", "b@y.test"]),
        ("a@x.test; b@y.test;", ["a@x.test", "b@y.test"]),
        (["a@x.test", "b@y.test; c@z.test"], ["a@x.test", "b@y.test", "c@z.test"]),
        ('"Doe, Jane" <jane@x.test>, Bob <bob@x.test>', ["jane@x.test", "bob@x.test"]),
        ('"Semi; Colon" <s@x.test>', ["s@x.test"]),
        ("Zoë Ærø <zoe@x.test>", ["zoe@x.test"]),
        ("user@bücher.example", ["user@xn--bcher-kva.example"]),
    ],
)
def test_address_lists(value, expected):
    assert [a.addr_spec for a in parse_addresses(value)] == expected


def test_display_names_survive_commas_and_unicode():
    (jane,) = parse_addresses('"Doe, Jane" <jane@x.test>')
    (zoe,) = parse_addresses("Zoë Ærø <zoe@x.test>")
    assert jane.display_name == "Doe, Jane"
    assert zoe.display_name == "Zoë Ærø"


@pytest.mark.parametrize("bad", ["not-an-address", "@x.test", "a@", "zoë@x.test", ""])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(MessageCompositionError):
        compose_message(sender="me@x.test", to=bad or None)


INJECTIONS = {
    "subject": {"subject": "hello\r\nBcc: victim@evil.test"},
    "subject-lf": {"subject": "hello\nX-Evil: 1"},
    "to": {"to": "a@x.test\r\nBcc: victim@evil.test"},
    "reply_to": {"reply_to": "a@x.test\nBcc: victim@evil.test"},
    "custom header value": {"custom_headers": {"X-Report": "1\r\nBcc: victim@evil.test"}},
    "custom header name": {"custom_headers": {"X-Report\r\nBcc": "victim@evil.test"}},
}


@pytest.mark.parametrize("field", sorted(INJECTIONS))
def test_header_injection_is_refused(field):
    fields = {"sender": "me@x.test", "to": "a@x.test", "subject": "s", **INJECTIONS[field]}
    with pytest.raises(MessageCompositionError, match="line break|header name|not a mail address"):
        compose_message(**fields)


def test_attachment_name_with_line_break_is_refused(tmp_path):
    path = tmp_path / "a\nb.txt"
    path.write_text("x")
    with pytest.raises(MessageCompositionError, match="header injection"):
        compose_message(sender="me@x.test", to="a@x.test", files=[path])


def test_reserved_headers_cannot_be_overridden():
    with pytest.raises(MessageCompositionError, match="may not set"):
        compose_message(sender="me@x.test", to="a@x.test", custom_headers={"Bcc": "x@y.test"})


def test_full_message_structure(tmp_path):
    report = tmp_path / "Überblick 2026 – report, final.csv"
    report.write_bytes(b"a,b\r\n1,2\n\xff binary tail")
    logo = tmp_path / "logo.png"
    logo.write_bytes(PNG)
    out = compose_message(
        sender="Zoë Reports <reports@x.test>",
        to=["Alex <alex@x.test>", "blair@x.test"],
        cc="carol@x.test",
        bcc="dave@x.test; erin@x.test",
        reply_to="help@x.test",
        subject="Grüße – Bericht ✓",
        text_content="plain text",
        html_content='<p>html <img src="cid:logo"></p>',
        files=[report],
        inline_images={"logo": logo},
        custom_headers={"X-Report-Id": "42"},
    )
    assert out.envelope_from == "reports@x.test"
    assert out.recipients == ("alex@x.test", "blair@x.test", "carol@x.test", "dave@x.test", "erin@x.test")
    raw = out.as_bytes()
    assert b"Bcc" not in raw and b"dave@" not in raw, "Bcc recipients never appear in the message"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii(), "7bit-safe: no dependency on 8BITMIME or SMTPUTF8"
    msg = parsed(out)
    assert msg["Subject"] == "Grüße – Bericht ✓"
    assert msg["From"].addresses[0].display_name == "Zoë Reports"
    assert msg["Message-ID"] == out.message_id and out.message_id.endswith("@x.test>")
    assert msg["X-Report-Id"] == "42" and msg["Reply-To"] == "help@x.test"
    assert msg.get_content_type() == "multipart/mixed"
    assert msg.get_body(("plain",)).get_content().strip() == "plain text"
    html = msg.get_body(("html",))
    assert "cid:logo" in html.get_content()
    (related,) = [p for p in msg.walk() if p.get_content_type() == "multipart/related"]
    (image,) = [p for p in related.iter_parts() if p.get_content_type() == "image/png"]
    assert image["Content-ID"] == "<logo>" and image.get_content() == PNG
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_filename() == "Überblick 2026 – report, final.csv"
    assert attachment.get_content_type() == "text/csv"
    assert attachment.get_payload(decode=True) == report.read_bytes(), "attachment bytes unchanged"


def test_rfc2231_filename_parameter(tmp_path):
    path = tmp_path / "résumé.pdf"
    path.write_bytes(b"%PDF-1.4")
    raw = compose_message(sender="me@x.test", to="a@x.test", files=[path]).as_bytes()
    assert b"filename*=utf-8''r%C3%A9sum%C3%A9.pdf" in raw


def test_html_only_and_text_only_bodies():
    html = parsed(compose_message(sender="me@x.test", to="a@x.test", html_content="<b>x</b>"))
    text = parsed(compose_message(sender="me@x.test", to="a@x.test", text_content="x"))
    assert html.get_content_type() == "text/html"
    assert text.get_content_type() == "text/plain"


def test_long_html_lines_are_encoded_not_cut():
    long_html = "<p>" + "é" * 5000 + "</p>"
    out = compose_message(sender="me@x.test", to="a@x.test", html_content=long_html)
    assert parsed(out).get_content().strip() == long_html


def test_missing_attachment_names_the_file(tmp_path):
    with pytest.raises(MessageCompositionError, match="missing.pdf"):
        compose_message(sender="me@x.test", to="a@x.test", files=[tmp_path / "missing.pdf"])


def test_no_recipient_is_an_error():
    with pytest.raises(MessageCompositionError, match="no recipient"):
        compose_message(sender="me@x.test", to=None)


def test_object_storage_path_like_attachment():
    class FakeStoragePath:
        name = "remote.parquet"

        def read_bytes(self):
            return b"PAR1"

    msg = parsed(compose_message(sender="me@x.test", to="a@x.test", files=[FakeStoragePath()]))
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_filename() == "remote.parquet" and attachment.get_payload(decode=True) == b"PAR1"
