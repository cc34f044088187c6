"""The Airflow plugin: the ``/o365mail`` app in the api-server and its entry in the UI navigation."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_o365mail.plugins import asset_listener
from airflow_provider_o365mail.plugins.consent_app import create_app


class O365MailPlugin(AirflowPlugin):
    name = "o365mail"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/o365mail", "name": "Microsoft 365 Mail consent"}]
    listeners = [asset_listener]
    external_views = [
        {"name": "Microsoft 365 Mail", "href": "/o365mail/", "destination": "nav", "category": "admin"},
    ]
