"""Smoke test of the *installed* wheel, run by scripts/package-check.sh in a fresh virtualenv.

Run from a directory outside the repository with a clean environment (no PYTHONPATH): every
import must come from site-packages, so a file missing from the wheel fails here, not in
production. No network, no Airflow DB.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

DIST = "airflow-provider-o365mail"
PACKAGE = "airflow_provider_o365mail"


def check(condition: bool, message: str) -> None:
    if not condition:
        print(f"SMOKE FAILED: {message}")
        sys.exit(1)


def main() -> None:
    started = time.monotonic()
    import airflow_provider_o365mail

    root = Path(airflow_provider_o365mail.__file__).parent
    check("site-packages" in root.parts, f"{PACKAGE} imported from {root}, not from the installed wheel")
    check((root / "py.typed").exists(), "py.typed is not installed")

    # Every public module imports (``__main__`` modules would run their CLI). The sandbox's milter
    # runs under Debian's python3 with python3-milter, never in the provider's environment.
    system_python_only = {f"{PACKAGE}.testing.smtp_milter"}
    modules = [PACKAGE] + [
        m.name
        for m in pkgutil.walk_packages([str(root)], prefix=f"{PACKAGE}.")
        if not m.name.endswith("__main__")
        and not any(part.startswith("_") for part in m.name.split("."))
        and m.name not in system_python_only
    ]
    # Modules of an optional extra import only with it (common.messaging asks for them when installed).
    needs_extra = {f"{PACKAGE}.queues.o365mail": "airflow.providers.common.messaging"}
    for name in modules:
        extra = needs_extra.get(name)
        if extra:
            try:
                importlib.import_module(extra)
            except ImportError:
                print(f"skipped {name}: its optional dependency {extra} is not installed")
                continue
        importlib.import_module(name)
    print(f"imported {len(modules)} modules in {time.monotonic() - started:.1f}s")

    # Entry points resolve from the installed distribution.
    dist = metadata.distribution(DIST)
    groups = {ep.group: ep for ep in dist.entry_points}
    for group in ("apache_airflow_provider", "airflow.plugins", "pytest11"):
        check(group in groups, f"entry point group {group} missing")
        groups[group].load()
    check_pytest_plugin()

    # What Airflow's providers manager and the UI's connection form read (no hook import in 3.3).
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    provider = manager.providers.get(DIST)
    check(provider is not None, f"{DIST} is not among the providers: {sorted(manager.providers)}")
    docs_url = next(u.split(", ", 1)[1] for u in dist.metadata.get_all("Project-URL") if u.startswith("Documentation"))
    # Airflow 3.2 keeps the space after the comma of "Documentation, <url>"; 3.3 strips it.
    check(
        (provider.data["documentation-url"] or "").strip() == docs_url,
        f"documentation-url is {provider.data['documentation-url']}",
    )
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    (meta,) = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "o365mail"]
    fields = meta.extra_fields or {}
    for name in ("tenant_id", "mailbox", "refresh_token", "imap_port", "smtp_port"):
        check(f"extra__o365mail__{name}" in fields or name in fields, f"connection form field {name} missing")
    check(meta.hook_name == "Microsoft 365 Mail (OAuth2)", f"hook name {meta.hook_name!r}")
    print(f"connection form: {meta.hook_name!r}, {len(fields)} extra fields")

    # The hook resolves a connection from the environment (no network: nothing is logged in).
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook

    os.environ["AIRFLOW_CONN_O365MAIL_SMOKE"] = json.dumps(
        {
            "conn_type": "o365mail",
            "login": "00000000-0000-0000-0000-0000000000aa",
            "password": "smoke-client-secret",
            "extra": {"tenant_id": "00000000-0000-0000-0000-0000000000bb", "mailbox": "reports@contoso.com"},
        }
    )
    settings = O365MailHook("o365mail_smoke").settings
    check(settings.mailbox == "reports@contoso.com", f"mailbox {settings.mailbox!r}")
    check(settings.imap_host == "outlook.office365.com", f"imap host {settings.imap_host!r}")
    check("smoke-client-secret" not in repr(settings), "the client secret appears in the settings' repr")
    print(f"hook: {O365MailHook('o365mail_smoke')!r} -> {settings.imap_host}:{settings.imap_port}")
    check_page_templates()
    print(f"smoke test OK in {time.monotonic() - started:.1f}s")


def check_page_templates() -> None:
    """The pages render from the wheel's package data (a template missing from it fails only here)."""
    from airflow_provider_o365mail.plugins import pages
    from airflow_provider_o365mail.testing.entra import pages as entra_pages

    row = {"conn_id": "o365mail_smoke", "grant_type": "authorization_code", "state": "needs-consent", "state_text": ""}
    rendered = {
        "index": pages.index_page("http://127.0.0.1/o365mail/callback", [row]),
        "result": pages.result_page(ok=True, conn_id="<smoke>", message="ok", scopes=["SMTP.Send"]),
        "sign-in": entra_pages.sign_in_page(flow_id="f", app_name="a", permissions=["SMTP.Send"], login_hint=""),
    }
    check("id='authorize-o365mail_smoke'" in rendered["index"], "the mail page has no Authorize button")
    check("<code>&lt;smoke&gt;</code>" in rendered["result"], "the result page does not escape the connection id")
    check('name="flow" value="f"' in rendered["sign-in"], "the Entra stand-in's sign-in page has no flow field")
    print(f"page templates: {', '.join(f'{name} {len(html)} chars' for name, html in rendered.items())}")


def check_pytest_plugin() -> None:
    """pytest autoloads the plugin from the wheel's entry point; an unrelated test run stays light."""
    heavy = ("airflow", "msal", "requests", "fastapi", "cryptography", "sqlalchemy")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_unrelated.py").write_text(
            "import sys\n"
            "def test_unrelated(pytestconfig):\n"
            "    assert pytestconfig.pluginmanager.has_plugin('o365mail_sandbox')\n"
            f"    loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))\n"
            "    assert loaded == [], loaded\n"
        )
        fixtures = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--fixtures", "test_unrelated.py"],
            cwd=tmp, capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        check("o365_sandbox" in fixtures.stdout, f"pytest lists no o365_sandbox fixture: {fixtures.stdout[-2000:]}")
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_unrelated.py"],
            cwd=tmp, capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        check(run.returncode == 0, f"unrelated test run with the plugin: {run.stdout[-2000:]}{run.stderr[-2000:]}")
    print("pytest11 plugin: autoloaded from the wheel, fixtures listed, no heavy import in an unrelated run")


if __name__ == "__main__":
    main()
