"""Microsoft Graph: sending mail where SMTP AUTH is off, and mail up to 150 MB.

``errors`` (Graph's error shape; causes and fixes, no I/O), ``mime`` (a composed message in the shapes
Graph takes), ``client`` (HTTPS requests with the connection's token, throttling and retries) and
``sender`` (a :class:`..core.sending.MessageSender` with the SMTP path's guarantees).
"""
