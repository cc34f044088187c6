"""Readable mail criteria compiled into IMAP SEARCH keys (no I/O).

Every user value becomes exactly one SEARCH argument: IMAPClient quotes it (escaping ``"`` and
``\\``) or, with non-ASCII characters, sends it as a literal under ``CHARSET UTF-8``. CR, LF and NUL
cannot appear in an IMAP string and would end the command line, so values holding them are
refused. No value can add keys to the search or commands to the session. What SEARCH cannot
express on Exchange (attachments) is decided from BODYSTRUCTURE afterwards
(:meth:`..core.criteria.MailCriteria.attachments_match`).
"""

from __future__ import annotations

from typing import Any

from airflow_provider_o365mail.core.criteria import MailCriteria, as_list
from airflow_provider_o365mail.exceptions import CriteriaError

__all__ = ["needs_utf8", "search_keys", "tokenize_raw_criteria"]


def search_keys(criteria: MailCriteria) -> list[Any]:
    """SEARCH keys for IMAPClient (``ALL`` when nothing narrows the search)."""
    keys: list[Any] = []
    keys += _any_of("FROM", as_list(criteria.sender), "sender")
    recipients = as_list(criteria.recipient)
    if recipients:
        keys += _or_chain(
            [[b"OR", b"TO", _text_argument(r, "recipient"), b"CC", _text_argument(r, "recipient")] for r in recipients]
        )
    if criteria.subject:
        keys += [b"SUBJECT", _text_argument(criteria.subject, "subject")]
    if criteria.since:
        keys += [b"SINCE", criteria.since]
    if criteria.before:
        keys += [b"BEFORE", criteria.before]
    if criteria.unseen:
        keys.append(b"UNSEEN")
    for name, value in criteria.header.items():
        keys += [b"HEADER", _text_argument(name, "header name"), _text_argument(value, f"header {name}")]
    for raw in as_list(criteria.criteria):
        keys += tokenize_raw_criteria(raw)
    return keys or [b"ALL"]


def needs_utf8(criteria: MailCriteria) -> bool:
    """Whether a value is not ASCII (SEARCH must then say ``CHARSET UTF-8``)."""
    values = [*as_list(criteria.sender), *as_list(criteria.recipient), criteria.subject or ""]
    values += [f"{k}{v}" for k, v in criteria.header.items()]
    return any(not value.isascii() for value in values)


def _text_argument(value: Any, name: str) -> bytes:
    text = str(value)
    if not text:
        raise CriteriaError(f"{name} must not be empty.")
    if any(c in text for c in "\r\n\0"):
        raise CriteriaError(
            f"{name} contains a line break or NUL character ({text[:60]!r}); IMAP SEARCH values cannot hold them. "
            "Search for a part of the value without line breaks."
        )
    return text.encode("utf-8")


def tokenize_raw_criteria(raw: str) -> list[Any]:
    """Split raw SEARCH text into the atoms, strings and groups IMAPClient re-serialises faithfully."""
    tokens: list[Any] = []
    stack: list[list[Any]] = [tokens]
    i = 0
    while i < len(raw):
        char = raw[i]
        if char.isspace():
            i += 1
        elif char == "(":
            group: list[Any] = []
            stack[-1].append(group)
            stack.append(group)
            i += 1
        elif char == ")":
            if len(stack) == 1:
                raise CriteriaError(f"Unbalanced ')' in criteria {raw!r}.")
            stack.pop()
            i += 1
        elif char == '"':
            value, i = _quoted_string(raw, i)
            stack[-1].append(_text_argument(value, "criteria string") if value else b'""')
        else:
            start = i
            while i < len(raw) and not raw[i].isspace() and raw[i] not in '()"':
                i += 1
            stack[-1].append(raw[start:i].encode("utf-8"))
    if len(stack) != 1:
        raise CriteriaError(f"Unbalanced '(' in criteria {raw!r}.")
    return tokens


def _quoted_string(raw: str, start: int) -> tuple[str, int]:
    out: list[str] = []
    i = start + 1
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw):
            out.append(raw[i + 1])
            i += 2
        elif raw[i] == '"':
            return "".join(out), i + 1
        else:
            out.append(raw[i])
            i += 1
    raise CriteriaError(f"Unterminated string in criteria {raw!r}.")


def _any_of(key: str, values: list[str], name: str) -> list[Any]:
    return _or_chain([[key.encode(), _text_argument(v, name)] for v in values])


def _or_chain(alternatives: list[list[Any]]) -> list[Any]:
    """``a``, ``OR a b``, ``OR a OR b c``...: IMAP's OR takes exactly two keys."""
    if not alternatives:
        return []
    if len(alternatives) == 1:
        return list(alternatives[0])
    return [b"OR", *_grouped(alternatives[0]), *_or_chain_grouped(alternatives[1:])]


def _or_chain_grouped(alternatives: list[list[Any]]) -> list[Any]:
    if len(alternatives) == 1:
        return _grouped(alternatives[0])
    return [b"OR", *_grouped(alternatives[0]), *_or_chain_grouped(alternatives[1:])]


def _grouped(keys: list[Any]) -> list[Any]:
    """One search key made of several tokens, parenthesised as a nested list for IMAPClient."""
    return [keys] if len(keys) > 1 else keys
