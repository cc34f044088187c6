"""The Airflow 3.1 connection form (the hook's methods) declares exactly the ``conn-fields`` of 3.2+.

Runs on every version with Airflow's own WTForms / Flask-AppBuilder stand-ins (what 3.1's api-server
substitutes when they are not installed); on 3.1 test_provider_registration.py also checks the form
the real ``HookMetaService`` builds from these methods.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from airflow_provider_o365mail.connection_defaults import CONN_FIELDS, UI_FIELD_BEHAVIOUR
from airflow_provider_o365mail.hooks.o365mail import O365MailHook


def _module(name: str, **attrs: object) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def airflow_form_stand_ins(monkeypatch):
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService as meta

    stand_ins = {
        "wtforms": _module(
            "wtforms",
            StringField=meta.MockStringField,
            IntegerField=meta.MockIntegerField,
            PasswordField=meta.MockPasswordField,
            BooleanField=meta.MockBooleanField,
        ),
        "wtforms.validators": _module("wtforms.validators", Optional=meta.MockOptional, any_of=meta.MockEnum),
        "flask_babel": _module("flask_babel", lazy_gettext=lambda text: text),
        "flask_appbuilder": _module("flask_appbuilder"),
        "flask_appbuilder.fieldwidgets": _module(
            "flask_appbuilder.fieldwidgets",
            BS3TextFieldWidget=meta.MockAnyWidget,
            BS3PasswordFieldWidget=meta.MockAnyWidget,
        ),
    }
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    return meta


def test_form_widgets_are_the_declared_conn_fields(airflow_form_stand_ins):
    widgets = O365MailHook.get_connection_form_widgets()
    assert list(widgets) == list(CONN_FIELDS)
    for name, spec in CONN_FIELDS.items():
        assert isinstance(widgets[name], airflow_form_stand_ins.MockBaseField), name
        dumped = widgets[name].param.dump()
        schema = spec["schema"]
        assert dumped["schema"]["title"] == spec["label"], name
        assert dumped["description"] == spec["description"], name
        assert dumped["schema"]["type"] == schema["type"], name
        assert dumped["value"] == schema.get("default"), name
        assert dumped["schema"].get("enum") == schema.get("enum"), name
        assert (dumped["schema"].get("format") == "password") is (schema.get("format") == "password"), name


def test_ui_field_behaviour_passes_airflows_schema():
    from airflow.providers_manager import ProvidersManager

    behaviour = O365MailHook.get_ui_field_behaviour()
    ProvidersManager()._customized_form_fields_schema_validator.validate(behaviour)
    assert behaviour == {
        "hidden_fields": UI_FIELD_BEHAVIOUR["hidden-fields"],
        "relabeling": UI_FIELD_BEHAVIOUR["relabeling"],
        "placeholders": UI_FIELD_BEHAVIOUR["placeholders"],
    }
