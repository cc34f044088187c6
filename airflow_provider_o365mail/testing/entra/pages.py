"""HTML of the sandbox sign-in and consent page (kept plain so a browser test can click it)."""

from __future__ import annotations

from html import escape

PERMISSION_TEXT = {
    "IMAP.AccessAsUser.All": "Read and write access to mailboxes via IMAP.",
    "SMTP.Send": "Send emails from mailboxes using SMTP AUTH.",
    "User.Read": "Sign you in and read your profile.",
    "offline_access": "Maintain access to data you have given it access to.",
    "openid": "Sign you in.",
    "profile": "View your basic profile.",
}


def sign_in_page(
    *, flow_id: str, app_name: str, permissions: list[str], login_hint: str, error: str | None = None
) -> str:
    items = "".join(
        f"<li><b>{escape(p)}</b> &mdash; {escape(PERMISSION_TEXT.get(p.rsplit('/', 1)[-1], 'Access ' + p))}</li>"
        for p in permissions
    )
    error_html = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in to your account</title>
<style>body{{font-family:sans-serif;max-width:34em;margin:3em auto}}.error{{color:#a00}}
label{{display:block;margin-top:1em}}input{{width:100%;padding:.4em}}button{{margin:1em .5em 0 0;padding:.5em 1.5em}}</style>
</head><body>
<h1>Sign in</h1>
<p>Microsoft 365 sandbox (airflow-provider-o365mail). No real account is used.</p>
{error_html}
<form method="post" action="">
<input type="hidden" name="flow" value="{escape(flow_id)}">
<label for="login">Email</label><input id="login" name="login" type="email" value="{escape(login_hint)}" autocomplete="username">
<label for="passwd">Password</label><input id="passwd" name="passwd" type="password" autocomplete="current-password">
<h2>Permissions requested</h2>
<p><b>{escape(app_name)}</b> would like to:</p>
<ul>{items}</ul>
<button type="submit" name="decision" value="accept" id="accept">Accept</button>
<button type="submit" name="decision" value="cancel" id="cancel">Cancel</button>
</form></body></html>"""


def error_page(title: str, body: dict) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title></head><body>
<h1>{escape(title)}</h1><p role="alert">{escape(body.get("error_description", ""))}</p>
</body></html>"""


def device_code_page(error: str | None = None) -> str:
    """Microsoft's "Enter code" page of the device code flow."""
    error_html = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Enter code</title>
<style>body{{font-family:sans-serif;max-width:34em;margin:3em auto}}.error{{color:#a00}}input{{width:100%;padding:.4em}}
button{{margin-top:1em;padding:.5em 1.5em}}</style></head><body>
<h1>Enter code</h1><p>Enter the code displayed on your app or device.</p>
{error_html}
<form method="post" action=""><input id="otc" name="otc" autocomplete="off" placeholder="Code">
<button type="submit" id="next">Next</button></form></body></html>"""


def device_done_page(*, app_name: str, accepted: bool) -> str:
    text = (
        f"You have signed in to the {escape(app_name)} application on your device. You may now close this window."
        if accepted
        else "You declined to sign in on your device. You may now close this window."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Device sign-in</title></head><body>
<h1>{"Signed in" if accepted else "Declined"}</h1><p role="status" id="result">{text}</p></body></html>"""
