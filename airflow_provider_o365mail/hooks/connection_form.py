"""The connection form for Airflow 3.1, built from the declaration that Airflow >= 3.2 reads.

Airflow 3.2 and 3.3 read ``conn-fields`` / ``ui-field-behaviour`` from the provider info and skip
the hook's methods when those are declared. Airflow 3.1 knows only the hook's
``get_connection_form_widgets`` / ``get_ui_field_behaviour``: its api-server imports the hook with
WTForms, Flask-Babel and Flask-AppBuilder replaced by stand-ins (when they are not installed) and
turns each field into the same JSON schema. Both come from ``connection_defaults.CONN_FIELDS`` and
``UI_FIELD_BEHAVIOUR``, so the forms cannot drift apart. 3.1's stand-ins know only string, integer,
password and boolean fields and an ``any_of`` choice: the ``url`` / ``email`` / ``date`` formats of
the declaration are dropped there (the values are still validated by ``connection.settings_from_fields``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_provider_o365mail.connection_defaults import CONN_FIELDS, UI_FIELD_BEHAVIOUR


def form_widgets(fields: Mapping[str, Mapping[str, Any]] = CONN_FIELDS) -> dict[str, Any]:
    """WTForms fields for ``fields`` (the ``conn-fields`` shape); imports the form libraries lazily."""
    from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import BooleanField, IntegerField, PasswordField, StringField
    from wtforms.validators import Optional, any_of

    widgets: dict[str, Any] = {}
    for name, spec in fields.items():
        schema = spec["schema"]
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        validators: list[Any] = [Optional()]
        if "enum" in schema:
            validators.append(any_of(list(schema["enum"])))
        kwargs: dict[str, Any] = {"description": spec.get("description", ""), "validators": validators}
        if "default" in schema:
            kwargs["default"] = schema["default"]
        if "boolean" in types:
            widgets[name] = BooleanField(lazy_gettext(spec["label"]), **kwargs)
            continue
        if "integer" in types:
            field_class, widget = IntegerField, BS3TextFieldWidget()
        elif schema.get("format") == "password":
            field_class, widget = PasswordField, BS3PasswordFieldWidget()
        else:
            field_class, widget = StringField, BS3TextFieldWidget()
        widgets[name] = field_class(lazy_gettext(spec["label"]), widget=widget, **kwargs)
    return widgets


def field_behaviour(declared: Mapping[str, Any] = UI_FIELD_BEHAVIOUR) -> dict[str, Any]:
    """``ui-field-behaviour`` with the key spelling of ``get_ui_field_behaviour`` (``hidden_fields``)."""
    return {key.replace("-", "_"): value for key, value in declared.items()}
