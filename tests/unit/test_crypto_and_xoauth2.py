from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from airflow_provider_o365mail.auth import crypto
from airflow_provider_o365mail.auth.xoauth2 import xoauth2_responder, xoauth2_string
from airflow_provider_o365mail.exceptions import TokenStoreError


def test_rotation_old_key_second_still_decrypts(monkeypatch):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", old)
    blob = crypto.encrypt(crypto.load_cipher(), b"cache")
    monkeypatch.setenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", f"{new},{old}")
    assert crypto.decrypt(crypto.load_cipher(), blob, "test") == b"cache"
    monkeypatch.setenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", new)
    with pytest.raises(TokenStoreError, match="cannot be decrypted"):
        crypto.decrypt(crypto.load_cipher(), blob, "test")


def test_key_derived_from_fernet_key_differs_from_it(monkeypatch):
    monkeypatch.delenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", raising=False)
    cipher = crypto.load_cipher()
    blob = crypto.encrypt(cipher, b"x")
    core = Fernet(crypto._configured("core", "fernet_key").encode())
    with pytest.raises(Exception):
        core.decrypt(blob.encode())
    assert crypto.decrypt(cipher, blob, "t") == b"x"


def test_no_key_at_all_says_what_to_set(monkeypatch):
    monkeypatch.delenv("AIRFLOW__O365MAIL__TOKEN_CACHE_KEYS", raising=False)
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "")
    with pytest.raises(TokenStoreError, match="token_cache_keys"):
        crypto.load_cipher()


def test_xoauth2_string_and_responder():
    s = xoauth2_string("a@b.c", "tok")
    assert s == "user=a@b.c\x01auth=Bearer tok\x01\x01"
    respond = xoauth2_responder(s)
    assert respond() == s and respond(b"") == s
    assert respond(b'{"status":"401"}') == "", "an error challenge is answered with an empty line"
    with pytest.raises(ValueError):
        xoauth2_string("a@b.c\r\nRCPT", "tok")
