"""Transport-neutral mail rules: composing, addresses, Message-IDs, the send ledger, the recipient
budget, watermarks, criteria, summaries, concurrency budgets. No socket, no protocol, no token store:
each transport package (``smtp``, ``imap``) adds only its protocol's I/O on top of these."""
