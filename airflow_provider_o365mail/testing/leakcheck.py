"""Scan text for secrets the sandbox issued (client secrets, access, id and refresh tokens)."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, quote_plus


def issued_secrets(state_dir: Path) -> set[str]:
    path = Path(state_dir) / "entra" / "issued-secrets.txt"
    if not path.exists():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if len(line.strip()) >= 16}


def probes(secret: str) -> set[str]:
    """The forms a secret can leak in: as is, URL-encoded, base64 (alone or inside an XOAUTH2 string).

    A JWT's header is shared by all tokens, so its signature-bearing tail is looked for too. Base64
    of a string embedded in a longer one (XOAUTH2 ``user=...^Aauth=Bearer <token>^A^A``) depends on
    its offset modulo 3: the three alignments are probed, each without its ragged edges.
    """
    found = {secret, quote(secret, safe=""), quote_plus(secret), base64.b64encode(secret.encode()).decode()}
    if secret.count(".") == 2:
        found.add(secret[-43:])
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret.encode()).decode()
        inner = encoded[(shift * 4 + 2) // 3 + 1 : -4]
        if len(inner) >= 16:
            found.add(inner)
    return found


def find_leaks(texts: Iterable[tuple[str, str]], secrets: set[str]) -> list[str]:
    """``(where, text)`` pairs in, one line per leak out (naming the place, never the secret)."""
    leaks = []
    for where, text in texts:
        if not text:
            continue
        for secret in secrets:
            if any(p in text for p in probes(secret)):
                leaks.append(
                    f"{where}: contains a secret issued by the sandbox ({len(secret)} chars, ends ...{secret[-4:]})"
                )
                break
    return leaks
