"""A mail folder as a message queue for ``MessageQueueTrigger`` (``apache-airflow-providers-common-messaging``).

``MessageQueueTrigger(scheme="o365mail", conn_id=..., folder=..., transport="imap" | "graph", ...)`` in an
``AssetWatcher`` builds an :class:`~airflow_provider_o365mail.triggers.imap_events.O365ImapEventTrigger`
with the same keyword arguments (criteria, post-action, ``transport``): the triggerer runs that trigger
itself (``MessageQueueTrigger.serialize()`` is the built trigger's), so watchers made either way share
streams and have the same guarantees. Airflow >= 3.3.

The older, deprecated ``queue=`` form (common-messaging 1.x, where ``scheme`` does not exist yet) is
accepted too: ``o365mail://{conn_id}/{folder path}?transport=graph&mailbox=...``; the other arguments
are keyword arguments as with ``scheme``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from airflow.providers.common.messaging.providers.base_provider import BaseMessageQueueProvider

from airflow_provider_o365mail.exceptions import ConnectionConfigError

if TYPE_CHECKING:
    from airflow.triggers.base import BaseEventTrigger

SCHEME = "o365mail"
#: What a ``queue=`` URI may set besides the connection and the folder (everything else: keyword arguments).
URI_OPTIONS = ("transport", "mailbox")


def parse_queue(queue: str) -> dict[str, Any]:
    """``o365mail://{conn_id}/{folder}?transport=...&mailbox=...`` -> the trigger's keyword arguments."""
    parts = urlsplit(queue)
    if parts.scheme != SCHEME:
        raise ConnectionConfigError(f"{queue!r} is not an {SCHEME}:// queue.")
    kwargs: dict[str, Any] = {}
    if parts.netloc:
        kwargs["conn_id"] = unquote(parts.netloc)
    folder = unquote(parts.path.lstrip("/"))
    if folder:
        kwargs["folder"] = folder
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if name not in URI_OPTIONS:
            raise ConnectionConfigError(
                f"{queue!r}: {name!r} cannot be set in an {SCHEME}:// queue URI (only {', '.join(URI_OPTIONS)}); "
                "pass it as a keyword argument of MessageQueueTrigger."
            )
        kwargs[name] = value
    return kwargs


class O365MailMessageQueueProvider(BaseMessageQueueProvider):
    """Microsoft 365 mail folders (IMAP or Microsoft Graph) for ``MessageQueueTrigger``.

    .. code-block:: python

        from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
        from airflow.sdk import Asset, AssetWatcher

        trigger = MessageQueueTrigger(
            scheme="o365mail", conn_id="o365mail_default", folder="INBOX", transport="graph", subject="Invoice"
        )
        invoices = Asset("invoices", watchers=[AssetWatcher(name="invoice_mail", trigger=trigger)])
    """

    scheme = SCHEME

    def scheme_matches(self, scheme: str) -> bool:
        return scheme == SCHEME

    def queue_matches(self, queue: str) -> bool:
        return str(queue).startswith(f"{SCHEME}://")

    def trigger_class(self) -> type[BaseEventTrigger]:
        from airflow_provider_o365mail.triggers.imap_events import O365ImapEventTrigger

        return O365ImapEventTrigger

    def trigger_kwargs(self, queue: str, **kwargs: Any) -> dict:
        from_uri = parse_queue(queue)
        both = sorted(set(from_uri) & set(kwargs))
        if both:
            raise ConnectionConfigError(
                f"{', '.join(both)} given both in the queue URI {queue!r} and as keyword arguments; give each once."
            )
        return from_uri


__all__ = ["SCHEME", "O365MailMessageQueueProvider", "parse_queue"]
