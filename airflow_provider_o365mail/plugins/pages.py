"""HTML of the Microsoft 365 Mail page (no I/O): everything user-supplied is escaped."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

STYLE = """
body{font-family:"Segoe UI",Helvetica,Arial,sans-serif;margin:2em;max-width:72em;color:#1b1b1b}
table{border-collapse:collapse;width:100%;margin-top:1em}th,td{border-bottom:1px solid #ddd;padding:.5em;text-align:left;vertical-align:top}
code{background:#f3f3f3;padding:.15em .35em}.ok{color:#107c10}.bad{color:#a4262c}.warn{color:#8a6100}
button{padding:.4em 1.2em;cursor:pointer}.box{border:1px solid #ccc;padding:1em;margin:1em 0;background:#fafafa}
"""


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{body}"
        "<p><a href='/'>Back to Airflow</a></p></body></html>"
    )


def index_page(callback_url: str, connections: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for c in connections:
        state_class = {"authorized": "ok", "app-only": "ok"}.get(c["state"], "bad")
        button = ""
        if c["grant_type"] == "authorization_code":
            button = (
                f"<form method='post' action='/o365mail/authorize/{escape(c['conn_id'], quote=True)}'>"
                f"<button type='submit' id='authorize-{escape(c['conn_id'], quote=True)}'>Authorize</button></form>"
            )
        rows.append(
            "<tr>"
            f"<td><code>{escape(c['conn_id'])}</code></td><td>{escape(c['mailbox'] or '-')}</td>"
            f"<td class='{state_class}' data-state='{escape(c['state'], quote=True)}'>{escape(c['state_text'])}</td>"
            f"<td>{escape(c.get('last_error') or '')}</td><td>{button}</td></tr>"
        )
    table = (
        "<table id='connections'><tr><th>Connection</th><th>Mailbox</th><th>State</th><th>Last error</th><th></th></tr>"
        + "".join(rows)
        + "</table>"
        if rows
        else "<p>No connection of type <code>o365mail</code> yet: create one under Admin &gt; Connections.</p>"
    )
    body = f"""
<div class='box'><p>Callback URL: register it in Entra ID under the app's <b>Authentication &gt; Web &gt; Redirect URIs</b>,
exactly as shown:</p>
<p><code id='callback-url'>{escape(callback_url)}</code>
<button type='button' id='copy-callback' onclick="navigator.clipboard.writeText(document.getElementById('callback-url').innerText)">Copy</button></p></div>
{table}"""
    return _page("Microsoft 365 Mail", body)


def result_page(*, ok: bool, conn_id: str, message: str, scopes: Iterable[str] = ()) -> str:
    scope_list = "".join(f"<li><code>{escape(s)}</code></li>" for s in scopes)
    body = (
        f"<p class='{'ok' if ok else 'bad'}' id='result' data-ok='{str(ok).lower()}'>{escape(message)}</p>"
        + (f"<p>Scopes granted:</p><ul id='scopes'>{scope_list}</ul>" if scope_list else "")
        + f"<p><a href='/o365mail/' id='back'>Back to Microsoft 365 Mail</a> (connection <code>{escape(conn_id)}</code>)</p>"
    )
    return _page("Microsoft 365 Mail: authorization", body)
