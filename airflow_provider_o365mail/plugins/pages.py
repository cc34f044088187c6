"""HTML of the Microsoft 365 Mail page: Jinja2 templates in ``templates/``, autoescaping on.

The page is plain HTML, CSS and a little JavaScript (no build step): ``templates/`` (package data)
holds it; this module turns connection states into the values it shows. Airflow 3.1+ shows it inside
its UI, in an iframe (an external view with a ``url_route``). Airflow passes the iframe no theme:
its UI (next-themes) puts the class ``light`` or ``dark`` on its ``<html>`` and keeps the choice in
``localStorage["theme"]``. The iframe is same-origin (sandbox ``allow-same-origin allow-scripts``),
so the page reads the parent's class and follows it live; standalone, it uses ``?theme=``,
then ``localStorage["theme"]``, then ``prefers-color-scheme``. Colors are Airflow's own tokens.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined

#: Airflow's UI route of the page: ``/plugin/<url_route>`` (see ``o365mail.py``).
UI_ROUTE = "o365mail"
CHECK_HEADER = "X-O365Mail-Check"

TEMPLATES = Path(__file__).parent / "templates"
#: Autoescaping on for every template (the CSS and JS ones too): a value is escaped unless it is
#: Markup (only the macros' own output is), so nothing given to a template is ever trusted as HTML.
#: StrictUndefined: a misspelt name fails instead of rendering empty.
ENVIRONMENT = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _render(template: str, **values: Any) -> str:
    return ENVIRONMENT.get_template(template).render(ui_route=UI_ROUTE, check_header=CHECK_HEADER, **values)


def authorize_path(conn_id: str) -> str:
    """The Authorize URL of a connection: the id is one encoded path segment (``/`` and ``..`` included)."""
    return "/o365mail/authorize/" + quote(conn_id, safe="")


def check_path(conn_id: str) -> str:
    return "/o365mail/api/check/" + quote(conn_id, safe="")


def moment(iso: str | None, now: dt.datetime) -> dict[str, str] | None:
    """``{iso, stamp: "2026-12-02 01:50 UTC", relative: "in 3 days"}``; ``None`` when unknown."""
    if not iso:
        return None
    at = dt.datetime.fromisoformat(iso)
    seconds = (at - now).total_seconds()
    amount = abs(seconds)
    span = (
        f"{amount / 86400:.0f} days"
        if amount >= 172800
        else f"{amount / 3600:.0f} h"
        if amount >= 7200
        else f"{amount / 60:.0f} min"
    )
    relative = f"in {span}" if seconds >= 0 else f"{span} ago"
    return {"iso": iso, "stamp": at.strftime("%Y-%m-%d %H:%M UTC"), "relative": relative}


def row_view(c: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """What a row shows, from a connection state (``connection_states.connection_state``): display values only."""
    conn_id = c["conn_id"]
    days = c.get("secret_days_left")
    can_authorize = c.get("grant_type") == "authorization_code" and c.get("credential_type") != "public_client"
    return {
        "conn_id": conn_id,
        "source": c.get("source") or "",
        "authorize_note": c.get("authorize_note"),
        "mailbox": c.get("mailbox") or "-",
        "grant_type": c.get("grant_type") or "",
        "transport": c.get("transport") or "",
        "scopes_needed": c.get("scopes_needed"),
        "delegated": c.get("grant_type") == "authorization_code",
        "state": c["state"],
        "level": c.get("level", "info"),
        "state_text": c["state_text"],
        "refresh_token_last_used": moment(c.get("refresh_token_last_used"), now),
        "refresh_token_expires_at": moment(c.get("refresh_token_expires_at"), now),
        "refresh_token_expiry_estimated": bool(c.get("refresh_token_expiry_estimated")),
        "access_token_expires_at": moment(c.get("access_token_expires_at"), now),
        "secret_expires_on": c.get("secret_expires_on"),
        "secret_level": c.get("secret_level", "info"),
        "secret_relative": f"expired {-days} days ago" if days is not None and days < 0 else f"in {days} days",
        "credential_warnings": [
            {"level": w.get("level", "warn"), "text": w.get("message", ""), "credential": w.get("credential", "")}
            for w in c.get("credential_warnings") or []
        ],
        "last_error": c.get("last_error"),
        "last_error_current": bool(c.get("last_error_current")),
        "last_error_at": moment(c.get("last_error_at"), now),
        "authorize_path": authorize_path(conn_id) if can_authorize else None,
        "check_path": check_path(conn_id),
    }


def row_cells(c: Mapping[str, Any], now: dt.datetime | None = None) -> str:
    """The cells of a connection's row (the Check answer carries them, to replace the row's)."""
    view = row_view(c, now or dt.datetime.now(dt.UTC))
    return str(ENVIRONMENT.get_template("connection_row.html").module.row_cells(view))  # type: ignore[attr-defined]


def index_page(callback_url: str, connections: Iterable[Mapping[str, Any]], *, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return _render("index.html", callback_url=callback_url, rows=[row_view(c, now) for c in connections])


def result_page(*, ok: bool, conn_id: str, message: str, scopes: Iterable[str] = ()) -> str:
    return _render("result.html", ok=ok, conn_id=conn_id, message=message, scopes=list(scopes))
