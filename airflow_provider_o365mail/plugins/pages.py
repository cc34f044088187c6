"""HTML of the Microsoft 365 Mail page (no I/O): everything user-supplied is escaped.

The page is plain HTML, CSS and a little JavaScript (no build step). Airflow 3.1+ shows it inside
its UI, in an iframe (an external view with a ``url_route``). Airflow passes the iframe no theme:
its UI (next-themes) puts the class ``light`` or ``dark`` on its ``<html>`` and keeps the choice in
``localStorage["theme"]``. The iframe is same-origin (sandbox ``allow-same-origin allow-scripts``),
so the page reads the parent's class and follows it live; standalone, it uses ``?theme=``,
then ``localStorage["theme"]``, then ``prefers-color-scheme``. Colors are Airflow's own tokens.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any
from urllib.parse import quote

#: Airflow's UI route of the page: ``/plugin/<url_route>`` (see ``o365mail.py``).
UI_ROUTE = "o365mail"
CHECK_HEADER = "X-O365Mail-Check"

STYLE = """
:root{color-scheme:light;--bg:#fff;--bg-subtle:oklch(0.985 0.004 253);--bg-muted:oklch(0.955 0.006 253);
--fg:#09090b;--fg-muted:oklch(0.45 0.055 251);--border:oklch(0.915 0.01 253);
--brand:oklch(0.469 0.084 257.657);--brand-solid:oklch(0.469 0.084 257.657);--brand-fg:#fff;--ok:oklch(0.527 0.154 150.069);
--warn:oklch(0.555 0.163 48.998);--error:oklch(0.577 0.245 27.325);--info:oklch(0.45 0.055 251)}
:root[data-theme=dark]{color-scheme:dark;--bg:#09090b;--bg-subtle:oklch(0.11 0.025 251);--bg-muted:oklch(0.18 0.03 251);
--fg:oklch(0.985 0.004 253);--fg-muted:oklch(0.75 0.025 252);--border:oklch(0.28 0.035 251);
--brand:oklch(0.705 0.066 256.378);--brand-solid:oklch(0.575 0.08 257.759);--brand-fg:#fff;--ok:oklch(0.792 0.209 151.711);
--warn:oklch(0.828 0.189 84.429);--error:oklch(0.704 0.191 22.216);--info:oklch(0.75 0.025 252)}
*{box-sizing:border-box}
body{margin:0;padding:24px 28px;background:var(--bg);color:var(--fg);font:14px/1.5 Inter,ui-sans-serif,system-ui,
-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
h1{font-size:24px;font-weight:600;margin:0 0 16px}h2{font-size:16px;font-weight:600;margin:0 0 8px}
a{color:var(--brand)}code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
background:var(--bg-muted);border-radius:4px;padding:1px 5px}
.card{border:1px solid var(--border);border-radius:8px;background:var(--bg-subtle);padding:14px 16px;margin:0 0 20px}
.muted{color:var(--fg-muted)}.small{font-size:12px}
table{border-collapse:separate;border-spacing:0;width:100%;border:1px solid var(--border);border-radius:8px;overflow:hidden}
th{background:var(--bg-muted);font-weight:600;text-align:left;font-size:13px}
th,td{padding:10px 10px;border-bottom:1px solid var(--border);vertical-align:top}
tbody:last-child tr:last-child>td{border-bottom:none}tr.checks-row>td{background:var(--bg-subtle);padding-top:4px}
dd{white-space:nowrap}.clamp{display:-webkit-box;-webkit-line-clamp:4;-webkit-box-orient:vertical;overflow:hidden;max-width:20em}td:first-child{min-width:14em;max-width:19em}
details.note summary{cursor:pointer;color:var(--brand)}
button{font:inherit;font-size:13px;font-weight:500;border-radius:6px;padding:5px 12px;cursor:pointer;
border:1px solid var(--border);background:var(--bg);color:var(--fg)}button:hover{background:var(--bg-muted)}
button.primary{background:var(--brand-solid);border-color:var(--brand-solid);color:var(--brand-fg)}button.primary:hover{opacity:.9}
button:disabled{opacity:.6;cursor:progress}
.actions{display:flex;gap:8px;flex-wrap:wrap;align-items:flex-start}.actions form{margin:0}
.badge{display:inline-block;border-radius:999px;padding:1px 9px;font-size:12px;font-weight:600;white-space:nowrap;
border:1px solid color-mix(in oklch,var(--c) 45%,transparent);color:var(--c);background:color-mix(in oklch,var(--c) 12%,transparent)}
.ok{--c:var(--ok)}.warn{--c:var(--warn)}.error{--c:var(--error)}.info{--c:var(--info)}
.text-ok{color:var(--ok)}.text-warn{color:var(--warn)}.text-error{color:var(--error)}.text-info{color:var(--fg-muted)}
dl{margin:0;display:grid;grid-template-columns:auto 1fr;gap:2px 10px;font-size:13px}dt{color:var(--fg-muted);white-space:nowrap}dd{margin:0}
.checks{list-style:none;margin:0;padding:0;columns:2;column-gap:32px}.checks li{break-inside:avoid}.checks li{padding:4px 0;border-top:1px dashed var(--border)}
.checks li:first-child{border-top:none}.fix{color:var(--fg-muted);font-size:12px;margin-left:56px}
.status{display:inline-block;width:56px}
.note{font-size:12px;color:var(--fg-muted);margin-top:6px;max-width:42em}
"""

SCRIPT = r"""
(function(){
  var root=document.documentElement;
  function parentHtml(){try{return window.parent!==window?window.parent.document.documentElement:null}catch(e){return null}}
  function mode(){
    var q=new URLSearchParams(location.search).get('theme');if(q==='dark'||q==='light')return q;
    var p=parentHtml();if(p){if(p.classList.contains('dark'))return 'dark';if(p.classList.contains('light'))return 'light';}
    var s=null;try{s=localStorage.getItem('theme')}catch(e){}if(s==='dark'||s==='light')return s;
    return matchMedia('(prefers-color-scheme: dark)').matches?'dark':'light';
  }
  function apply(){root.dataset.theme=mode();}
  apply();
  var p=parentHtml();
  if(p)new MutationObserver(apply).observe(p,{attributes:true,attributeFilter:['class','style']});
  addEventListener('storage',apply);
  matchMedia('(prefers-color-scheme: dark)').addEventListener('change',apply);
  root.dataset.embedded=p?'true':'false';
})();
document.addEventListener('DOMContentLoaded',function(){
  var embedded=document.documentElement.dataset.embedded==='true';
  document.querySelectorAll('[data-standalone-only]').forEach(function(el){el.hidden=embedded;});
  var copy=document.getElementById('copy-callback');
  if(copy)copy.addEventListener('click',function(){
    var text=document.getElementById('callback-url').innerText;
    function done(){copy.textContent='Copied';setTimeout(function(){copy.textContent='Copy'},2000);}
    function fallback(){var r=document.createRange();r.selectNodeContents(document.getElementById('callback-url'));
      var s=getSelection();s.removeAllRanges();s.addRange(r);try{document.execCommand('copy');done();}catch(e){}}
    if(navigator.clipboard&&navigator.clipboard.writeText)navigator.clipboard.writeText(text).then(done,fallback);else fallback();
  });
  // Inside Airflow's iframe the sign-in must be the top-level page (Entra ID refuses to be framed, and
  // the sandbox forbids the frame to navigate its parent): the same POST is sent from the parent's document.
  document.addEventListener('submit',function(ev){
    var form=ev.target;
    if(!embedded||!form.matches("form[action^='/o365mail/authorize/']"))return;
    try{var top=window.top.document,f=top.createElement('form');
      f.method='post';f.action=new URL(form.getAttribute('action'),location.href).href;f.style.display='none';
      top.body.appendChild(f);ev.preventDefault();f.submit();}catch(e){}
  });
  document.addEventListener('click',function(ev){
      var button=ev.target.closest('button.check');if(!button)return;
      var row=button.closest('tbody'),list=row.querySelector('.checks');
      button.disabled=true;button.textContent='Checking…';row.querySelector('.checks-row').hidden=false;list.innerHTML='<li class="muted">running the checks…</li>';
      fetch(button.dataset.url,{method:'POST',credentials:'same-origin',headers:{'__HEADER__':'1','Accept':'application/json'}})
        .then(function(r){return r.json().then(function(b){if(!r.ok)throw new Error(b.detail||('HTTP '+r.status));return b;});})
        .then(function(body){
          list.innerHTML='';
          body.checks.forEach(function(c){
            var li=document.createElement('li');li.dataset.status=c.status;li.dataset.link=c.link;
            var cls={ok:'text-ok',warn:'text-warn',fail:'text-error',skip:'text-info'}[c.status]||'text-info';
            var st=document.createElement('b');st.className='status '+cls;st.textContent=c.status.toUpperCase();
            var link=document.createElement('b');link.textContent=c.link+': ';
            li.append(st,link,document.createTextNode(c.detail));
            if(c.fix){var fx=document.createElement('div');fx.className='fix';fx.textContent='Fix: '+c.fix;li.append(fx);}
            list.append(li);
          });
          row.querySelector('tr.conn').innerHTML=body.row_html;  // the state, tokens and error, read again
          row.dataset.checked=body.checks.some(function(c){return c.status==='fail'})?'fail':'ok';
        })
        .catch(function(err){list.innerHTML='';var li=document.createElement('li');li.className='text-error';
          li.textContent='Check failed: '+err.message;list.append(li);row.dataset.checked='error';})
        .finally(function(){var b=row.querySelector('button.check');b.disabled=false;b.textContent='Check';});
  });
});
""".replace("__HEADER__", CHECK_HEADER)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )


def authorize_path(conn_id: str) -> str:
    """The Authorize URL of a connection: the id is one encoded path segment (``/`` and ``..`` included)."""
    return "/o365mail/authorize/" + quote(conn_id, safe="")


def check_path(conn_id: str) -> str:
    return "/o365mail/api/check/" + quote(conn_id, safe="")


def _when(iso: str | None, now: dt.datetime) -> str:
    """``2026-12-02 01:50 UTC (in 3 days)``, escaped; ``-`` when unknown."""
    if not iso:
        return "<span class='muted'>-</span>"
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
    stamp = escape(at.strftime("%Y-%m-%d %H:%M UTC"))
    return f"<time datetime='{escape(iso, quote=True)}'>{stamp}</time> <span class='muted'>({relative})</span>"


def _tokens_cell(c: Mapping[str, Any], now: dt.datetime) -> str:
    if c.get("grant_type") != "authorization_code":
        return f"<dl><dt>access token expires</dt><dd>{_when(c.get('access_token_expires_at'), now)}</dd></dl>"
    expiry_label = "refresh token expires" + (" if unused" if c.get("refresh_token_expiry_estimated") else "")
    return (
        "<dl>"
        f"<dt>refresh token used</dt><dd data-field='refresh-last-used'>{_when(c.get('refresh_token_last_used'), now)}</dd>"
        f"<dt>{escape(expiry_label)}</dt><dd data-field='refresh-expires'>{_when(c.get('refresh_token_expires_at'), now)}</dd>"
        f"<dt>access token expires</dt><dd>{_when(c.get('access_token_expires_at'), now)}</dd>"
        "</dl>"
    )


def _secret_cell(c: Mapping[str, Any]) -> str:
    expires = c.get("secret_expires_on")
    if not expires:
        return "<span class='muted' data-field='secret-expiry'>not recorded</span><div class='note'>Set <code>credential_expires_on</code> in the connection to be warned.</div>"
    days = c.get("secret_days_left")
    relative = f"expired {-days} days ago" if days is not None and days < 0 else f"in {days} days"
    return (
        f"<span class='text-{escape(c.get('secret_level', 'info'), quote=True)}' data-field='secret-expiry'>"
        f"{escape(expires)} ({escape(relative)})</span>"
    )


def _error_cell(c: Mapping[str, Any], now: dt.datetime) -> str:
    if not c.get("last_error"):
        return "<span class='muted'>none</span>"
    when = _when(c.get("last_error_at"), now)
    text = escape(c["last_error"])
    if c.get("last_error_current"):
        return f"<div class='text-error clamp' data-field='last-error' title='{text}'>{text}</div><div class='small'>{when}</div>"
    return (
        f"<div class='muted clamp' data-field='last-error' title='{text}'>{text}</div>"
        f"<div class='small muted'>{when}; recovered: the token store was written since</div>"
    )


def row_cells(c: Mapping[str, Any], now: dt.datetime | None = None) -> str:
    """The cells of a connection's row (the Check answer carries them, to replace the row's)."""
    now = now or dt.datetime.now(dt.UTC)
    conn_id = c["conn_id"]
    level = c.get("level", "info")
    buttons = []
    if c.get("grant_type") == "authorization_code" and c.get("credential_type") != "public_client":
        buttons.append(
            f"<form method='post' action='{escape(authorize_path(conn_id), quote=True)}'>"
            f"<button type='submit' class='primary' id='authorize-{escape(conn_id, quote=True)}'>Authorize</button></form>"
        )
    buttons.append(
        f"<button type='button' class='check' data-conn-id='{escape(conn_id, quote=True)}' "
        f"data-url='{escape(check_path(conn_id), quote=True)}'>Check</button>"
    )
    note = (
        f"<details class='note'><summary>How to authorize it</summary><div data-field='authorize-note'>"
        f"{escape(c['authorize_note'])}</div></details>"
        if c.get("authorize_note")
        else ""
    )
    return (
        f"<td><code>{escape(conn_id)}</code><div class='small muted' data-field='source'>{escape(c.get('source') or '')}</div>{note}</td>"
        f"<td>{escape(c.get('mailbox') or '-')}<div class='small muted'>{escape(c.get('grant_type') or '')}</div></td>"
        f"<td><span class='badge {escape(level, quote=True)}' data-state='{escape(c['state'], quote=True)}' "
        f"data-level='{escape(level, quote=True)}'>{escape(c['state'])}</span>"
        f"<div class='small state-text'>{escape(c['state_text'])}</div></td>"
        f"<td>{_tokens_cell(c, now)}</td><td>{_secret_cell(c)}</td><td>{_error_cell(c, now)}</td>"
        f"<td><div class='actions'>{''.join(buttons)}</div></td>"
    )


def _row(c: Mapping[str, Any], now: dt.datetime) -> str:
    attrs = (
        f"data-conn-id='{escape(c['conn_id'], quote=True)}' data-source='{escape(c.get('source') or '', quote=True)}'"
    )
    return (
        f"<tbody {attrs}><tr class='conn'>{row_cells(c, now)}</tr>"
        "<tr class='checks-row' hidden><td colspan='7'><ol class='checks'></ol></td></tr></tbody>"
    )


def index_page(callback_url: str, connections: Iterable[Mapping[str, Any]], *, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    rows = [_row(c, now) for c in connections]
    table = (
        "<table id='connections'><thead><tr><th>Connection</th><th>Mailbox</th><th>State</th><th>Tokens</th>"
        "<th>Client secret expires</th><th>Last error</th><th></th></tr></thead>" + "".join(rows) + "</table>"
        if rows
        else "<p class='card'>No connection of type <code>o365mail</code> yet: create one under Admin &gt; Connections, "
        "or define it as <code>AIRFLOW_CONN_&lt;ID&gt;</code> or in a secrets backend.</p>"
    )
    body = f"""
<p data-standalone-only hidden class='small'><a id='open-in-airflow' href='/plugin/{UI_ROUTE}'>Open inside Airflow's UI</a>
&middot; <a href='/'>Back to Airflow</a></p>
<div class='card'><h2>Callback URL</h2><p class='muted' style='margin:0 0 8px'>Register it in Entra ID under the app's
<b>Authentication &gt; Web &gt; Redirect URIs</b>, exactly as shown (set <code>[api] base_url</code> to the address users open).</p>
<code id='callback-url'>{escape(callback_url)}</code>
<button type='button' id='copy-callback'>Copy</button></div>
{table}
<p class='small muted'>Check runs the checks of <code>airflow o365mail doctor</code> (endpoints, client secret, token
store, a forced token refresh, IMAP and SMTP login). No token is ever shown on this page.</p>"""
    return _page("Microsoft 365 Mail", body)


def result_page(*, ok: bool, conn_id: str, message: str, scopes: Iterable[str] = ()) -> str:
    scope_list = "".join(f"<li><code>{escape(s)}</code></li>" for s in scopes)
    body = (
        f"<div class='card'><p class='text-{'ok' if ok else 'error'}' id='result' data-ok='{str(ok).lower()}'>"
        f"{escape(message)}</p>"
        + (f"<p>Scopes granted:</p><ul id='scopes'>{scope_list}</ul>" if scope_list else "")
        + "</div>"
        + f"<p><a href='/plugin/{UI_ROUTE}' id='back-to-airflow'>Back to Admin &gt; Microsoft 365 Mail in Airflow</a>"
        f" &middot; <a href='/o365mail/' id='back'>this page alone</a> (connection <code>{escape(conn_id)}</code>)</p>"
    )
    return _page("Microsoft 365 Mail: authorization", body)
