"""Local Microsoft 365 sandbox for tests and offline DAG development.

``python -m airflow_provider_o365mail.testing up --env-file .sandbox.env`` starts an Entra ID
stand-in (HTTPS), Dovecot (IMAP, XOAUTH2) and Postfix (submission, XOAUTH2) on 127.0.0.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider_o365mail.testing.sandbox import Sandbox, SandboxInfo, read_env_file

__all__ = ["Sandbox", "SandboxInfo", "read_env_file"]


def __getattr__(name: str) -> Any:
    # Lazy: pytest imports this package for the pytest11 plugin in every test run of every user
    # who installed the provider, and the sandbox's milter imports stdlib-only modules of it under
    # Debian's python3: the sandbox (requests, cryptography...) loads only when used.
    if name in __all__:
        from airflow_provider_o365mail.testing import sandbox

        return getattr(sandbox, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
