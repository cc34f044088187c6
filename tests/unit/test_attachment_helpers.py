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
