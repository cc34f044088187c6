"""Issue #15 small items in mail/: line separators, several addresses in one part, reserved file names."""

from __future__ import annotations

import pytest

from airflow_provider_o365mail.core.addresses import parse_address, parse_addresses
from airflow_provider_o365mail.core.attachments import safe_file_name
from airflow_provider_o365mail.exceptions import MessageCompositionError
from airflow_provider_o365mail.version_compat import AirflowFailException


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("a@b\x85.com", id="nel-in-domain"),
        pytest.param("a@b\u2028.com", id="line-separator-in-domain"),
        pytest.param("Jane\u2029 <a@b.com>", id="paragraph-separator-in-name"),
        pytest.param("Jane\x85 <a@b.com>", id="nel-in-name"),
        pytest.param("Jane\x0b <a@b.com>", id="vertical-tab"),
    ],
)
def test_line_separators_are_a_composition_error_not_a_raw_unicode_error(text):
    with pytest.raises(MessageCompositionError, match="line break") as err:
        parse_address(text, field="to")
    assert isinstance(err.value, AirflowFailException), "not retried"


def test_an_undecodable_international_domain_is_a_composition_error():
    with pytest.raises(MessageCompositionError, match="international domain name"):
        parse_address("a@b\u00ad\u200b\ufffe.com", field="to")


@pytest.mark.parametrize(
    "text", ["x <a@b.com> <c@d.com>", "a@b.com <c@d.com>", "x <a@b.com> trailing words"], ids=["two", "bare", "junk"]
)
def test_a_part_with_two_addresses_is_refused_not_truncated(text):
    with pytest.raises(MessageCompositionError, match="more than one address"):
        parse_addresses(text, field="to")


def test_ordinary_addresses_still_parse():
    parsed = parse_addresses('"Doe, Jane" <a@b.com>; Jim (work) <c@d.com>, e@f.com', field="to")
    assert [a.addr_spec for a in parsed] == ["a@b.com", "c@d.com", "e@f.com"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("NUL.tar.gz", "_NUL.tar.gz"), ("con.txt", "_con.txt"), ("COM1.a.b", "_COM1.a.b"), ("CON .log", "_CON .log")],
)
def test_windows_device_names_are_caught_before_the_first_dot(name, expected):
    assert safe_file_name(name) == expected


def test_names_that_only_start_like_devices_are_kept():
    assert safe_file_name("NULL.txt") == "NULL.txt" and safe_file_name("console.log") == "console.log"
