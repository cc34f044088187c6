"""Local Microsoft 365 sandbox for tests and offline DAG development.

``python -m airflow_provider_o365mail.testing up --env-file .sandbox.env`` starts an Entra ID
stand-in (HTTPS), Dovecot (IMAP, XOAUTH2) and Postfix (submission, XOAUTH2) on 127.0.0.1.
"""

from airflow_provider_o365mail.testing.sandbox import Sandbox, SandboxInfo, read_env_file

__all__ = ["Sandbox", "SandboxInfo", "read_env_file"]
