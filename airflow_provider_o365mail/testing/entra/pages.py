"""HTML of the sandbox sign-in and consent pages (kept plain so a browser test can click them).

Jinja2 templates in ``templates/`` (package data), autoescaping on: every value is escaped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

PERMISSION_TEXT = {
    "IMAP.AccessAsUser.All": "Read and write access to mailboxes via IMAP.",
    "SMTP.Send": "Send emails from mailboxes using SMTP AUTH.",
    "User.Read": "Sign you in and read your profile.",
    "offline_access": "Maintain access to data you have given it access to.",
    "openid": "Sign you in.",
    "profile": "View your basic profile.",
}

TEMPLATES = Path(__file__).parent / "templates"
ENVIRONMENT = Environment(
    loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True
)


def _render(template: str, **values: Any) -> str:
    return ENVIRONMENT.get_template(template).render(**values)


def sign_in_page(
    *, flow_id: str, app_name: str, permissions: list[str], login_hint: str, error: str | None = None
) -> str:
    shown = [{"scope": p, "text": PERMISSION_TEXT.get(p.rsplit("/", 1)[-1], "Access " + p)} for p in permissions]
    return _render(
        "sign_in.html", flow_id=flow_id, app_name=app_name, permissions=shown, login_hint=login_hint, error=error
    )


def error_page(title: str, body: dict) -> str:
    return _render("error.html", title=title, description=body.get("error_description", ""))


def device_code_page(error: str | None = None) -> str:
    """Microsoft's "Enter code" page of the device code flow."""
    return _render("device_code.html", error=error)


def device_done_page(*, app_name: str, accepted: bool) -> str:
    return _render("device_done.html", app_name=app_name, accepted=accepted)
