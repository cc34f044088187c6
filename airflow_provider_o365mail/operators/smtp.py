"""The operator's former name, kept working: ``O365SmtpOperator`` is :class:`.send_mail.O365SendMailOperator`."""

from __future__ import annotations

from airflow_provider_o365mail.operators.send_mail import MESSAGE_FIELDS, O365SendMailOperator


class O365SmtpOperator(O365SendMailOperator):
    """:class:`~airflow_provider_o365mail.operators.send_mail.O365SendMailOperator` under its former name
    (it sends through the connection's ``transport`` too, SMTP or Microsoft Graph)."""


__all__ = ["MESSAGE_FIELDS", "O365SendMailOperator", "O365SmtpOperator"]
