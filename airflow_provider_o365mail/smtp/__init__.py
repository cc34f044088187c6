"""Sending over SMTP submission (STARTTLS, AUTH XOAUTH2): the protocol's I/O only. The rules every
transport shares (composing, the send ledger, Message-IDs) live in ``core``."""
