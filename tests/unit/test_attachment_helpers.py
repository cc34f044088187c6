"""Safe file names and streaming transfer-encoding decoders."""

from __future__ import annotations

import base64
import quopri

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_o365mail.core.attachments import StreamDecoder, safe_file_name, unique_name


@pytest.mark.parametrize(
    ("hostile", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\Windows\\System32\\evil.exe", "evil.exe"),
        ("C:\\Users\\x\\report.pdf", "report.pdf"),
        ("/absolute/path.txt", "path.txt"),
        (".bashrc", "bashrc"),
        ("..", "attachment"),
        ("", "attachment"),
        (None, "attachment"),
        ("a\r\nb\x00c.txt", "a__b_c.txt"),
        ('inv<o>i:c"e|?*.pdf', "inv_o_i_c_e___.pdf"),
        ("CON.txt", "_CON.txt"),
        ("Rechnung März.pdf", "Rechnung März.pdf"),
    ],
)
def test_safe_file_name(hostile, expected):
    assert safe_file_name(hostile) == expected


@given(st.text(max_size=400))
def test_safe_file_name_never_escapes_and_stays_short(name):
    safe = safe_file_name(name)
    assert safe and "/" not in safe and "\\" not in safe and not safe.startswith(".")
    assert len(safe.encode()) <= 200 and all(ord(c) >= 0x20 for c in safe)


def test_unique_name():
    taken = {"a.pdf", "a (1).pdf"}
    assert unique_name("a.pdf", taken) == "a (2).pdf" and unique_name("b.pdf", taken) == "b.pdf"


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(1, 500), max_size=20))
def test_streaming_base64_and_quoted_printable_decode_like_the_whole(data, cuts):
    for encoding, encoded in (
        ("base64", base64.encodebytes(data).replace(b"\n", b"\r\n")),
        ("quoted-printable", quopri.encodestring(data).replace(b"\n", b"\r\n")),
        ("binary", data),
    ):
        decoder = StreamDecoder(encoding)
        out, position = b"", 0
        for cut in cuts:
            out += decoder.feed(encoded[position : position + cut])
            position += cut
        out += decoder.feed(encoded[position:]) + decoder.finish()
        expected = quopri.decodestring(encoded) if encoding == "quoted-printable" else data
        assert out == expected, encoding


class _GoneClient:
    """A folder whose UIDVALIDITY changed and where the message is gone."""

    def select_folder(self, folder, readonly):
        return {b"UIDVALIDITY": 99}

    def search(self, query):
        return []


class _DroppingClient:
    """Serves one 4-byte slice of a part, then the connection breaks."""

    def __init__(self):
        self.fetches = 0

    def select_folder(self, folder, readonly):
        return {b"UIDVALIDITY": 1}

    def fetch(self, uids, items):
        self.fetches += 1
        if self.fetches > 1:
            raise OSError("connection reset")
        return {uids[0]: {b"BODY[2]<0>": b"abcd"}}


def _run_operator(tmp_path, monkeypatch, client, chunk_bytes=1024 * 1024):
    import contextlib

    from airflow_provider_o365mail.hooks import o365mail
    from airflow_provider_o365mail.imap.attachments import ImapAttachmentReader
    from airflow_provider_o365mail.operators.imap_attachments import O365ImapAttachmentOperator

    @contextlib.contextmanager
    def reader(self, mailbox=None):
        yield ImapAttachmentReader(client, chunk_bytes=chunk_bytes)

    monkeypatch.setattr(o365mail.O365MailHook, "attachment_reader", reader)
    messages = [
        {
            "folder": "INBOX",
            "uidvalidity": 1,
            "uid": 5,
            "message_id": "<m@x>",
            "attachments": [{"name": "a.pdf", "section": "2", "encoding": "7bit"}],
        }
    ]
    O365ImapAttachmentOperator(task_id="t", messages=messages, target_dir=str(tmp_path)).execute({})


def test_a_message_that_is_gone_leaves_no_empty_file(tmp_path, monkeypatch):
    from airflow_provider_o365mail.exceptions import MailServerError

    with pytest.raises(MailServerError, match="no longer in INBOX"):
        _run_operator(tmp_path, monkeypatch, _GoneClient())
    assert list(tmp_path.iterdir()) == []  # a retry writes a.pdf, not "a (1).pdf" beside an empty one


def test_a_download_that_breaks_part_way_leaves_no_partial_file(tmp_path, monkeypatch):
    with pytest.raises(OSError, match="reset"):
        _run_operator(tmp_path, monkeypatch, _DroppingClient(), chunk_bytes=4)
    assert list(tmp_path.iterdir()) == []
