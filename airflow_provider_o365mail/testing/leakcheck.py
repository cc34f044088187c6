"""Scan text for secrets the sandbox issued (client secrets, access, id and refresh tokens)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def issued_secrets(state_dir: Path) -> set[str]:
    path = Path(state_dir) / "entra" / "issued-secrets.txt"
    if not path.exists():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if len(line.strip()) >= 16}


def find_leaks(texts: Iterable[tuple[str, str]], secrets: set[str]) -> list[str]:
    """``(where, text)`` pairs in, one line per leak out (naming the place, never the secret)."""
    leaks = []
    for where, text in texts:
        if not text:
            continue
        for secret in secrets:
            # A JWT's header is shared by all tokens; look for the signature-bearing tail too.
            probes = {secret, secret[-43:]} if secret.count(".") == 2 else {secret}
            if any(p in text for p in probes):
                leaks.append(
                    f"{where}: contains a secret issued by the sandbox ({len(secret)} chars, ends ...{secret[-4:]})"
                )
                break
    return leaks
