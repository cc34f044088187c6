"""Attachment download helpers without I/O of their own: safe file names and streaming decoders."""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from pathlib import PurePosixPath

MAX_NAME_BYTES = 200
_RESERVED = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_file_name(name: str | None, fallback: str = "attachment") -> str:
    """A file name that stays inside its directory whatever the sender wrote.

    ``../../etc/passwd`` -> ``passwd``; ``C:\\x\\evil.exe`` -> ``evil.exe``; control characters and
    reserved characters become ``_``; no leading dots; at most 200 UTF-8 bytes (extension kept).
    """
    text = unicodedata.normalize("NFC", str(name or ""))
    text = text.replace("\\", "/").split("/")[-1]
    text = _RESERVED.sub("_", text).strip().lstrip(".").strip()
    if not text or set(text) <= {"_", " "}:
        text = fallback
    stem, dot, suffix = text.rpartition(".")
    if not dot:
        stem, suffix = text, ""
    # Windows reserves the device name before the *first* dot ("NUL.tar.gz" opens NUL), with
    # trailing spaces ignored ("CON .txt").
    if text.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        text = f"_{text}"
        stem, dot, suffix = text.rpartition(".")
        if not dot:
            stem, suffix = text, ""
    suffix = suffix[:20]
    budget = MAX_NAME_BYTES - len(suffix.encode()) - (1 if suffix else 0)
    stem_bytes = stem.encode()[:budget]
    stem = stem_bytes.decode("utf-8", errors="ignore") or fallback
    return f"{stem}.{suffix}" if suffix else stem


def unique_name(name: str, taken: set[str]) -> str:
    """``report.pdf``, then ``report (1).pdf``, ``report (2).pdf``..."""
    if name not in taken:
        return name
    path = PurePosixPath(name)
    for number in range(1, 10_000):
        candidate = f"{path.stem} ({number}){path.suffix}"
        if candidate not in taken:
            return candidate
    raise FileExistsError(name)


class StreamDecoder:
    """Decode a Content-Transfer-Encoding incrementally (feed encoded chunks, get bytes)."""

    def __init__(self, encoding: str | None) -> None:
        self.encoding = (encoding or "7bit").lower()
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.encoding == "base64":
            data = self._pending + re.sub(rb"[^A-Za-z0-9+/=]", b"", chunk)
            usable = len(data) - len(data) % 4
            self._pending = data[usable:]
            return _b64(data[:usable])
        if self.encoding == "quoted-printable":
            data = self._pending + chunk
            cut = data.rfind(b"\n") + 1  # decode whole lines only (soft breaks end with '=')
            self._pending = data[cut:]
            return binascii.a2b_qp(data[:cut])
        return chunk

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        if self.encoding == "base64":
            rest = rest.rstrip(b"=")
            return _b64(rest + b"=" * (-len(rest) % 4)) if rest else b""
        if self.encoding == "quoted-printable":
            return binascii.a2b_qp(rest)
        return rest


def _b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(data)
    except binascii.Error:  # broken padding in the middle: decode what can be decoded
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=False)
