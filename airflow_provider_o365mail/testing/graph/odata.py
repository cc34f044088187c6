"""OData query options on message collections, as Outlook's Graph endpoints take them (no I/O).

- ``$filter``: comparisons ``eq ne gt ge lt le`` on the properties in :data:`FILTERABLE`,
  ``startswith(p,'x')`` and ``contains(p,'x')`` on string properties, ``and``, ``or``, ``not`` and
  parentheses (query-parameters.md); an unknown property is 400 ``BadRequest`` "Could not find a
  property named ...", a syntax error 400 ``BadRequest``. Lambda operators (``any``/``all``) on
  recipients and ``endswith`` are not implemented (501).
- ``$orderby``: ``prop [asc|desc]``, several separated by commas; with a ``$filter`` the
  InefficientFilter rule of user-list-messages.md applies.
- ``$search``: KQL-lite (search-query-parameter.md): ``"word"`` looks in from, subject and body;
  ``subject:``, ``body:``, ``from:``, ``to:``, ``cc:``, ``participants:``, ``recipients:`` target
  one; terms are ANDed unless joined by ``OR``. A term matches where a word of the field starts with
  it (case-insensitive). Not with ``$filter`` or ``$orderby`` (400 as Graph answers).
- ``$select``: a comma-separated list of known properties.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from airflow_provider_o365mail.testing.graph import errors

#: Message properties a $filter may name (path -> kind).
FILTERABLE: dict[str, str] = {
    "receivedDateTime": "datetime",
    "sentDateTime": "datetime",
    "createdDateTime": "datetime",
    "lastModifiedDateTime": "datetime",
    "isRead": "bool",
    "isDraft": "bool",
    "hasAttachments": "bool",
    "importance": "string",
    "subject": "string",
    "internetMessageId": "string",
    "conversationId": "string",
    "parentFolderId": "string",
    "inferenceClassification": "string",
    "flag/flagStatus": "string",
    "from/emailAddress/address": "string",
    "from/emailAddress/name": "string",
    "sender/emailAddress/address": "string",
    "sender/emailAddress/name": "string",
}
#: Properties of the message resource the stand-in knows ($select, $orderby).
PROPERTIES = (
    "id",
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "internetMessageId",
    "subject",
    "bodyPreview",
    "importance",
    "parentFolderId",
    "conversationId",
    "isDeliveryReceiptRequested",
    "isReadReceiptRequested",
    "isRead",
    "isDraft",
    "webLink",
    "inferenceClassification",
    "body",
    "uniqueBody",
    "sender",
    "from",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
    "flag",
    "internetMessageHeaders",
)
#: Properties that need the message's body (the rest come from its header and flags).
BODY_PROPERTIES = frozenset({"body", "uniqueBody", "bodyPreview", "hasAttachments"})
_COMPARISONS = ("eq", "ne", "gt", "ge", "lt", "le")
_TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<punct>[(),])|"
    r"(?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))|"
    r"(?P<word>[A-Za-z_][A-Za-z0-9_/.]*|-?\d+(?:\.\d+)?))"
)


def parse_datetime(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def value_at(message: dict[str, Any], path: str) -> Any:
    value: Any = message
    for part in path.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# ---------------------------------------------------------------------- $filter
@dataclass(frozen=True)
class Filter:
    """A parsed ``$filter``: the properties it names (in order of appearance) and its test."""

    text: str
    properties: tuple[str, ...]
    test: Callable[[dict[str, Any]], bool]

    def matches(self, message: dict[str, Any]) -> bool:
        return self.test(message)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        found = _TOKEN.match(text, pos)
        if found is None or found.end() == pos:
            raise errors.bad_query(f"Invalid filter clause: syntax error at position {pos} in '{text}'.")
        kind = found.lastgroup or ""
        out.append((kind, found.group(kind)))
        pos = found.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.properties: list[str] = []

    def fail(self, what: str = "syntax error") -> errors.GraphError:
        return errors.bad_query(f"Invalid filter clause: {what} in '{self.text}'.")

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise self.fail("unexpected end")
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        if self.take()[1] != value:
            raise self.fail(f"'{value}' expected")

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "word" and token[1].lower() == word:
            self.pos += 1
            return True
        return False

    def parse(self) -> Filter:
        test = self.expression()
        if self.peek() is not None:
            raise self.fail(f"unexpected '{self.peek()[1]}'")  # type: ignore[index]
        return Filter(self.text, tuple(self.properties), test)

    def expression(self) -> Callable[[dict[str, Any]], bool]:
        parts = [self.conjunction()]
        while self.keyword("or"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else (lambda m, ps=tuple(parts): any(p(m) for p in ps))

    def conjunction(self) -> Callable[[dict[str, Any]], bool]:
        parts = [self.unary()]
        while self.keyword("and"):
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else (lambda m, ps=tuple(parts): all(p(m) for p in ps))

    def unary(self) -> Callable[[dict[str, Any]], bool]:
        if self.keyword("not"):
            inner = self.unary()
            return lambda m: not inner(m)
        token = self.peek()
        if token == ("punct", "("):
            self.take()
            inner = self.expression()
            self.expect(")")
            return inner
        return self.comparison()

    def property(self) -> tuple[str, str]:
        kind, name = self.take()
        if kind != "word":
            raise self.fail("property expected")
        known = {k.lower(): k for k in FILTERABLE}
        path = known.get(name.lower())
        if path is None:
            if name.split("/")[0].lower() in ("torecipients", "ccrecipients", "bccrecipients", "body"):
                raise errors.unsupported(f"$filter on '{name}'")
            raise errors.unknown_property(name)
        self.properties.append(path.split("/")[0])
        return path, FILTERABLE[path]

    def literal(self, kind: str) -> Any:
        token_kind, raw = self.take()
        if token_kind == "string":
            value: Any = raw[1:-1].replace("''", "'")
            if kind == "bool":
                raise self.fail(f"'{value}' is not an Edm.Boolean")
            if kind == "datetime":
                try:
                    return parse_datetime(value)
                except ValueError:
                    raise self.fail(f"'{value}' is not a DateTimeOffset") from None
            return value
        if token_kind == "datetime":
            if kind != "datetime":
                raise self.fail(f"a {kind} value expected")
            return parse_datetime(raw)
        if raw.lower() in ("true", "false"):
            if kind != "bool":
                raise self.fail(f"a {kind} value expected")
            return raw.lower() == "true"
        if raw.lower() == "null":
            return None
        raise self.fail(f"'{raw}' is not a literal")

    def comparison(self) -> Callable[[dict[str, Any]], bool]:
        kind, word = self.peek() or ("", "")
        if kind == "word" and word.lower() in ("startswith", "contains", "endswith"):
            self.take()
            function = word.lower()
            if function == "endswith":
                raise errors.unsupported("endswith() in $filter")
            self.expect("(")
            path, prop_kind = self.property()
            if prop_kind != "string":
                raise self.fail(f"{function}() takes a string property")
            self.expect(",")
            needle = str(self.literal("string")).lower()
            self.expect(")")
            if function == "startswith":
                return lambda m: str(value_at(m, path) or "").lower().startswith(needle)
            return lambda m: needle in str(value_at(m, path) or "").lower()
        path, prop_kind = self.property()
        kind, operator = self.take()
        operator = operator.lower()
        if kind != "word" or operator not in _COMPARISONS:
            raise self.fail(f"comparison operator expected after '{path}'")
        expected = self.literal(prop_kind)
        return _compare(path, prop_kind, operator, expected)


def _compare(path: str, kind: str, operator: str, expected: Any) -> Callable[[dict[str, Any]], bool]:
    def test(message: dict[str, Any]) -> bool:
        actual = value_at(message, path)
        if actual is not None and kind == "datetime":
            actual = parse_datetime(actual)
        if kind == "string":  # Exchange compares strings case-insensitively
            actual = actual.lower() if isinstance(actual, str) else actual
            wanted = expected.lower() if isinstance(expected, str) else expected
        else:
            wanted = expected
        if operator == "eq":
            return actual == wanted
        if operator == "ne":
            return actual != wanted
        if actual is None or wanted is None:
            return False
        return {"gt": actual > wanted, "ge": actual >= wanted, "lt": actual < wanted, "le": actual <= wanted}[operator]

    return test


def parse_filter(text: str) -> Filter:
    if not text.strip():
        raise errors.bad_query("The $filter query option is empty.")
    if re.search(r"/(any|all)\s*\(", text, re.I):
        raise errors.unsupported("lambda operators (any/all) in $filter")
    return _Parser(text).parse()


# ---------------------------------------------------------------------- $orderby
def parse_orderby(text: str) -> list[tuple[str, bool]]:
    """``[(property, descending)]``."""
    known = {p.lower(): p for p in (*PROPERTIES, *FILTERABLE)}
    out = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise errors.bad_query(f"Invalid $orderby expression '{text}'.")
        name = known.get(words[0].lower())
        if name is None:
            raise errors.unknown_property(words[0])
        out.append((name, len(words) == 2 and words[1].lower() == "desc"))
    return out


def check_filter_and_orderby(filter_: Filter, orderby: list[tuple[str, bool]]) -> None:
    """user-list-messages.md: $orderby properties appear in $filter, in the same order, before the others."""
    ordered = [name.split("/")[0] for name, _ in orderby]
    if filter_.properties[: len(ordered)] != tuple(ordered):
        raise errors.inefficient_filter()


def sort_key(orderby: list[tuple[str, bool]]) -> Callable[[dict[str, Any]], Any]:
    def key(message: dict[str, Any]) -> tuple:
        out = []
        for name, descending in orderby:
            value = value_at(message, name)
            if isinstance(value, dict):
                value = str(value)
            ranked = _Reversed(value) if descending else _Plain(value)
            out.append(ranked)
        return tuple(out)

    return key


class _Plain:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Plain) -> bool:
        if self.value is None or other.value is None:
            return self.value is None and other.value is not None
        return bool(self.value < other.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Plain) and self.value == other.value


class _Reversed(_Plain):
    def __lt__(self, other: _Plain) -> bool:
        return _Plain(other.value) < _Plain(self.value)


# ---------------------------------------------------------------------- $search
SEARCH_FIELDS = {
    "subject": ("subject",),
    "body": ("body",),
    "from": ("from",),
    "to": ("to",),
    "cc": ("cc",),
    "participants": ("from", "to", "cc"),
    "recipients": ("to", "cc"),
}
_DEFAULT_FIELDS = ("from", "subject", "body")


@dataclass(frozen=True)
class Search:
    """A parsed ``$search``: groups of (fields, term) ANDed inside a group, the groups ORed."""

    groups: tuple[tuple[tuple[tuple[str, ...], str], ...], ...]

    def matches(self, texts: dict[str, str]) -> bool:
        return any(all(_term_in(term, [texts.get(f, "") for f in fields]) for fields, term in g) for g in self.groups)


def _term_in(term: str, texts: list[str]) -> bool:
    pattern = re.compile(r"(?<!\w)" + re.escape(term.lower()))
    return any(pattern.search(text.lower()) for text in texts)


def parse_search(text: str) -> Search:
    value = text.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    parts = re.findall(r'(\w+:)?(?:\\"([^"]*)\\"|"([^"]*)"|(\S+))', value)
    groups: list[list[tuple[tuple[str, ...], str]]] = [[]]
    for prefix, escaped, quoted, bare in parts:
        term = escaped or quoted or bare
        if not prefix and term == "OR":
            groups.append([])
            continue
        if not prefix and term == "AND":
            continue
        fields = _DEFAULT_FIELDS
        if prefix:
            fields = SEARCH_FIELDS.get(prefix[:-1].lower(), ())
            if not fields:
                raise errors.unsupported(f"$search on '{prefix[:-1]}'")
        if term:
            groups[-1].append((fields, term))
    groups = [g for g in groups if g]
    if not groups:
        raise errors.bad_query("The $search query option is empty.")
    return Search(tuple(tuple(g) for g in groups))


# ---------------------------------------------------------------------- $select
def parse_select(text: str | None) -> list[str] | None:
    if not text:
        return None
    known = {p.lower(): p for p in PROPERTIES}
    out = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name.lower() not in known:
            raise errors.unknown_property(name)
        out.append(known[name.lower()])
    return out or None
