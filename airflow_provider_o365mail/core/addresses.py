"""Parse and check mail addresses and header values (no I/O).

Addresses arrive from users and templates as ``"a@x, B <b@y>"``, ``"a@x; b@y"`` or lists; display
names may hold non-ASCII characters and quoted commas. Header values must never carry CR, LF or
any other line boundary Python knows (``\x85``, ``\u2028``...: header injection). A part that holds
more than one address (``"x <a@b> <c@d>"``) is refused rather than reduced to its first address.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.headerregistry import Address
from email.utils import getaddresses, parseaddr

from airflow_provider_o365mail.exceptions import MessageCompositionError

AddressInput = str | Iterable[str] | None

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'
#: NUL and every character ``str.splitlines`` breaks on: the email package folds headers with it.
LINE_BREAKS = "\0\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def check_header_value(name: str, value: str) -> str:
    """Refuse NUL and line breaks (CR, LF, U+0085, U+2028...) in a header value: header injection."""
    if any(c in value for c in LINE_BREAKS):
        raise MessageCompositionError(
            f"The {name} header value contains a line break or NUL character; refusing to build the message "
            "(header injection). Remove line breaks from the value."
        )
    return value


def check_header_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise MessageCompositionError(
            f"{name!r} is not a valid header name (printable ASCII without spaces or ':' only)."
        )
    return name


def _split(text: str) -> list[str]:
    """Split on ``,`` and ``;`` outside quotes, comments and angle brackets."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    depth_angle = depth_paren = 0
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted:
            if char == "<":
                depth_angle += 1
            elif char == ">":
                depth_angle = max(0, depth_angle - 1)
            elif char == "(":
                depth_paren += 1
            elif char == ")":
                depth_paren = max(0, depth_paren - 1)
            elif char in ",;" and not depth_angle and not depth_paren:
                parts.append("".join(current))
                current = []
                continue
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_address(text: str, *, field: str = "address") -> Address:
    """One address: ``a@x``, ``Name <a@x>`` or ``"Doe, Jane" <a@x>``; non-ASCII names are fine."""
    check_header_value(field, text)
    found = [pair for pair in getaddresses([text]) if any(pair)]
    if len(found) > 1:
        raise MessageCompositionError(
            f"{field}: {text!r} holds more than one address or text after the address; refusing to guess which "
            "is meant. Separate addresses with commas, and quote display names that contain '<' or '@'."
        )
    name, addr_spec = parseaddr(text)
    if not addr_spec or "@" not in addr_spec or addr_spec.startswith("@") or addr_spec.endswith("@"):
        raise MessageCompositionError(f"{field}: {text!r} is not a mail address (expected name@domain).")
    local, _, domain = addr_spec.rpartition("@")
    if not local.isascii():
        raise MessageCompositionError(
            f"{field}: {addr_spec!r} has a non-ASCII local part; Microsoft 365 SMTP submission accepts only "
            "ASCII addresses."
        )
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as err:
            raise MessageCompositionError(
                f"{field}: the domain of {addr_spec!r} is not a valid international domain name ({err.__cause__ or err}). "
                "Check the address for stray or invisible characters."
            ) from None
    try:
        return Address(display_name=name, username=local, domain=domain)
    except (ValueError, IndexError) as err:
        raise MessageCompositionError(f"{field}: {text!r} is not a valid mail address ({err}).") from None


def parse_addresses(value: AddressInput, *, field: str = "address") -> list[Address]:
    """All addresses in ``value`` (string with ``,``/``;`` separators, or an iterable of such strings)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    addresses: list[Address] = []
    for item in items:
        if not isinstance(item, str):
            raise MessageCompositionError(f"{field}: expected strings, got {type(item).__name__}.")
        addresses.extend(parse_address(part, field=field) for part in _split(item))
    return addresses
