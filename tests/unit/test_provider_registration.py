from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import distribution, entry_points

from airflow_provider_o365mail.connection_defaults import CONN_FIELDS
from airflow_provider_o365mail.get_provider_info import get_provider_info


def test_package_name_matches_the_distribution():
    info = get_provider_info()
    assert info["package-name"] == distribution("airflow-provider-o365mail").metadata["Name"]
    eps = [
        ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_provider_o365mail")
    ]
    assert len(eps) == 1 and eps[0].load() is get_provider_info


def test_secret_fields_are_masked_and_named_so():
    fields = get_provider_info()["connection-types"][0]["conn-fields"]
    assert fields["refresh_token"]["schema"]["format"] == "password"
    for name in fields:
        if name != "refresh_token":
            assert "token" not in name and "secret" not in name, f"{name} would be masked by Airflow"


def test_providers_manager_and_hook_meta_see_the_connection_type():
    """The form the UI gets: from ``conn-fields`` on Airflow >= 3.2, from the hook's methods on 3.1."""
    code = """
import json, warnings
from airflow.providers_manager import ProvidersManager
pm = ProvidersManager()
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    meta = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "o365mail"]
print(json.dumps({
  "provider": "airflow-provider-o365mail" in pm.providers,
  "hook": pm.hooks["o365mail"].hook_class_name if "o365mail" in pm.hooks else None,
  "meta": [m.model_dump(mode="json") for m in meta],
  "warnings": [str(w.message) for w in caught if "O365MailHook" in str(w.message)],
}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["provider"] is True
    assert result["hook"] == "airflow_provider_o365mail.hooks.o365mail.O365MailHook"
    assert result["warnings"] == []  # 3.2+ skips the hook's legacy methods when conn-fields are declared
    (meta,) = result["meta"]
    assert meta["hook_name"] == "Microsoft 365 Mail (OAuth2)"
    extra = meta["extra_fields"]
    assert set(extra) == set(CONN_FIELDS)
    for name, spec in CONN_FIELDS.items():
        assert extra[name]["schema"]["type"] == spec["schema"]["type"], name
        assert extra[name]["schema"].get("enum") == spec["schema"].get("enum"), name
        assert extra[name]["value"] == spec["schema"].get("default"), name
        assert extra[name]["description"] == spec["description"], name
        assert spec["label"] in (extra[name]["schema"].get("title"), extra[name].get("title")), name
    assert extra["refresh_token"]["schema"]["format"] == "password"
    assert meta["standard_fields"]["login"]["title"] == "Client ID"
    assert meta["standard_fields"]["password"]["title"] == "Client secret"
    assert meta["standard_fields"]["host"]["hidden"] is True


def test_airflow_providers_list_shows_the_provider():
    out = subprocess.run(
        [sys.executable, "-m", "airflow", "providers", "list", "-o", "json"], capture_output=True, text=True, check=True
    ).stdout
    names = [p["package_name"] for p in json.loads(out[out.index("[") :])]
    assert "airflow-provider-o365mail" in names


def test_every_module_listed_in_provider_info_imports():
    import importlib

    from airflow_provider_o365mail.get_provider_info import get_provider_info

    info = get_provider_info()
    modules = [
        m for key in ("operators", "sensors", "triggers", "hooks") for item in info[key] for m in item["python-modules"]
    ]
    dotted = [*info["notifications"], *info["email-backends"]]
    assert len(modules) == 7
    for module in modules:
        importlib.import_module(module)
    for path in dotted:
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), path


def test_the_operators_former_name_still_works():
    from airflow_provider_o365mail.operators.send_mail import O365SendMailOperator
    from airflow_provider_o365mail.operators.smtp import O365SmtpOperator

    task = O365SmtpOperator(task_id="old_name", to="a@contoso.com", subject="s", text_content="t")
    assert isinstance(task, O365SendMailOperator)
    assert task.template_fields == O365SendMailOperator.template_fields
