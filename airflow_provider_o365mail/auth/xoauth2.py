"""SASL XOAUTH2 (no I/O)."""

from __future__ import annotations

from airflow_provider_o365mail.auth.masking import mask_xoauth2


def xoauth2_string(user: str, access_token: str) -> str:
    """``user=<user>^Aauth=Bearer <token>^A^A``: the client library base64-encodes it.

    The string and its base64 form are registered with Airflow's masker before it is returned.
    """
    if any(c in user for c in "\x01\r\n") or any(c in access_token for c in "\x01\r\n "):
        raise ValueError("XOAUTH2 user or token contains a control character")
    mask_xoauth2(user, access_token)
    return f"user={user}\x01auth=Bearer {access_token}\x01\x01"


def xoauth2_responder(sasl_string: str):
    """A SASL callback: the string on the first (empty) challenge, an empty answer to an error.

    After a failed login the server sends a JSON error as a challenge and waits for an empty
    line; sending the token again would leak it into a second round and confuse the server.
    """

    def respond(challenge: bytes | str | None = None) -> str:
        return "" if challenge else sasl_string

    return respond
