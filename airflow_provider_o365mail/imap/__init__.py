"""Receiving over IMAP (XOAUTH2, IDLE): the protocol's I/O and its wire formats (SEARCH, FETCH,
BODYSTRUCTURE). The rules every transport shares (criteria, summaries, watermarks) live in ``core``."""
