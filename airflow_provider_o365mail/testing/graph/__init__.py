"""Microsoft Graph stand-in (sending and reading mail) of the sandbox: ``https://127.0.0.1:<port>/v1.0/...``.

One job per module: ``errors`` (Graph's error shape and codes), ``tokens`` (bearer token checks),
``tenant`` (users, mailboxes and their rights), ``messages`` (Graph message JSON and MIME to RFC 5322),
``mailstore`` (delivery into the sandbox's Dovecot), ``limits`` (Outlook's per app and mailbox
throttling), ``faults`` (injected failures), ``drafts`` and ``uploads`` (drafts and upload sessions),
``service`` (the sending operations and the permission table), ``reader`` (the reading operations:
folders, messages, attachments, read/flag/move/delete, delta) with ``ids`` (message and folder IDs),
``odata`` ($filter, $orderby, $search, $select), ``mailview`` (MIME to body, preview, attachments) and
``delta`` (delta tokens on disk), ``api``/``upload_host``/``admin_api`` (HTTP) and ``server`` (the process).
"""
