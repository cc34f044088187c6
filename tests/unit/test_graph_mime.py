"""The MIME Graph gets: a Bcc header for hidden recipients only, partial resends that reach no served
recipient, drafts without attachments, and the composed message left as it was."""

from __future__ import annotations

import base64
import email
import os
from email import policy
from email.utils import getaddresses

from airflow_provider_o365mail.core.compose import compose_message
from airflow_provider_o365mail.graph.mime import (
    DetachedAttachment,
    draft_without_attachments,
    estimated_mime_body_size,
    mime_body,
)

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100"
    "18dd8db00000000049454e44ae426082"
)
MiB = 1024 * 1024


def parsed(body: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(base64.b64decode(body), policy=policy.default)


def addresses(msg, name: str) -> list[str]:
    return [address.lower() for _, address in getaddresses([str(v) for v in msg.get_all(name) or ()]) if address]


def headers_and_body(message) -> tuple[list[tuple[str, str]], bytes]:
    raw = message.as_bytes()
    return sorted((k, str(v)) for k, v in message.message.items()), raw[raw.index(b"\r\n\r\n") :]


def composed(**fields):
    fields.setdefault("sender", "Reports <reports@contoso.example>")
    fields.setdefault("subject", "Q3")
    fields.setdefault("text_content", "body")
    return compose_message(**fields)


def test_bcc_header_holds_exactly_the_hidden_recipients():
    message = composed(to="Zoë <a@x.example>", cc='"Doe, Blair" <b@x.example>', bcc="c@x.example, d@x.example")
    msg = parsed(mime_body(message, message.recipients))
    assert addresses(msg, "To") == ["a@x.example"] and addresses(msg, "Cc") == ["b@x.example"]
    assert addresses(msg, "Bcc") == ["c@x.example", "d@x.example"]
    assert msg["To"].addresses[0].display_name == "Zoë"
    assert msg["Message-ID"] == message.message_id


def test_no_bcc_header_without_hidden_recipients():
    message = composed(to="a@x.example", cc="b@x.example")
    msg = parsed(mime_body(message, message.recipients))
    assert "Bcc" not in msg
    assert estimated_mime_body_size(message) >= len(mime_body(message, message.recipients))


def test_a_partial_resend_names_no_recipient_already_served():
    message = composed(
        to="Ann <a@x.example>, Bob <b@x.example>", cc="c@x.example, d@x.example", bcc="e@x.example, f@x.example"
    )
    served = {"a@x.example", "c@x.example", "e@x.example"}
    pending = [r for r in message.recipients if r not in served]
    msg = parsed(mime_body(message, pending))
    named = addresses(msg, "To") + addresses(msg, "Cc") + addresses(msg, "Bcc")
    assert sorted(named) == sorted(pending), "every pending recipient exactly once, no served one"
    assert addresses(msg, "To") == ["b@x.example"] and msg["To"].addresses[0].display_name == "Bob"
    assert addresses(msg, "Cc") == ["d@x.example"] and addresses(msg, "Bcc") == ["f@x.example"]


def test_a_partial_resend_to_bcc_only_drops_to_and_cc():
    message = composed(to="a@x.example", cc="b@x.example", bcc="c@x.example")
    msg = parsed(mime_body(message, ["c@x.example"]))
    assert "To" not in msg and "Cc" not in msg
    assert addresses(msg, "Bcc") == ["c@x.example"]


def test_the_message_headers_are_restored_afterwards():
    message = composed(to="Ann <a@x.example>, b@x.example", cc="c@x.example", bcc="d@x.example")
    before = headers_and_body(message)
    mime_body(message, message.recipients)
    mime_body(message, ["b@x.example", "d@x.example"])
    draft_without_attachments(message, ["d@x.example"])
    assert headers_and_body(message) == before, "same header values (their order may change) and body"
    assert "Bcc" not in message.message, "the SMTP path's message never shows its Bcc recipients"


def test_draft_without_attachments_detaches_files_keeps_inline_images_and_message_id(tmp_path):
    large = tmp_path / "extract.bin"
    large.write_bytes(os.urandom(3 * MiB + 17))  # over compose's stream threshold: sent from its file
    small = tmp_path / "notes.txt"
    small.write_bytes(b"a few notes\r\n")
    logo = tmp_path / "logo.png"
    logo.write_bytes(PNG)
    message = composed(
        to="a@x.example",
        bcc="b@x.example",
        html_content='<p><img src="cid:logo"></p>',
        files=[large, small],
        inline_images={"logo": logo},
        custom_headers={"X-Report-Id": "Q3-2026"},
    )
    assert len(message.streamed) == 1, "the large file is streamed, the small one in memory"
    before = headers_and_body(message)
    parts_before = len(message.message.get_payload())

    skeleton, detached = draft_without_attachments(message, message.recipients)

    msg = parsed(skeleton)
    assert msg["Message-ID"] == message.message_id and msg["X-Report-Id"] == "Q3-2026"
    assert addresses(msg, "Bcc") == ["b@x.example"]
    assert not list(msg.iter_attachments()), "no file attachment left in the draft"
    images = [p for p in msg.walk() if p["Content-ID"] == "<logo>"]
    assert len(images) == 1 and images[0].get_content() == PNG
    assert msg.get_body(("html",)).get_content().strip() == '<p><img src="cid:logo"></p>'
    assert len(skeleton) < 64 * 1024, "the draft is the body only"

    assert [(d.name, d.size) for d in detached] == [(large.name, large.stat().st_size), (small.name, 13)]
    streamed, in_memory = detached
    assert streamed.path == large and streamed.data is None, "the large file is read from disk, not held"
    assert in_memory.data == small.read_bytes() and in_memory.content_type == "text/plain"
    assert streamed.read() == large.read_bytes()

    assert headers_and_body(message) == before and len(message.message.get_payload()) == parts_before


def test_a_message_without_attachments_is_its_whole_mime():
    message = composed(to="a@x.example")
    skeleton, detached = draft_without_attachments(message, message.recipients)
    assert detached == [] and parsed(skeleton)["Message-ID"] == message.message_id


def test_detached_chunks_from_a_file_and_from_memory_resume_at_an_offset(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    for attachment in (
        DetachedAttachment("f.bin", "application/octet-stream", len(data), path=path),
        DetachedAttachment("f.bin", "application/octet-stream", len(data), data=data),
    ):
        chunks = list(attachment.chunks(4096))
        assert [offset for offset, _ in chunks] == [0, 4096, 8192]
        assert b"".join(piece for _, piece in chunks) == data
        resumed = list(attachment.chunks(4096, start=4096))
        assert resumed[0][0] == 4096 and b"".join(p for _, p in resumed) == data[4096:]
