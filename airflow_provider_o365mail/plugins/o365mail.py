"""The Airflow plugin: the ``/o365mail`` app in the api-server and its page in the UI's Admin menu.

The external view has a ``url_route``, so Airflow 3.1+ renders ``/o365mail/`` inside its UI at
``/plugin/o365mail`` (an iframe, same origin); without one it would open in a new tab. The
listeners record reported messages (``asset_listener``) and run the credential watch in the
scheduler and the triggerer (``credential_listener``), and give back a task's connection slots before
its process stops (``slot_listener``).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_o365mail.plugins import asset_listener, credential_listener, slot_listener
from airflow_provider_o365mail.plugins.consent_app import create_app
from airflow_provider_o365mail.plugins.pages import UI_ROUTE


class O365MailPlugin(AirflowPlugin):
    name = "o365mail"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/o365mail", "name": "Microsoft 365 Mail consent"}]
    listeners = [asset_listener, credential_listener, slot_listener]
    external_views = [
        {
            "name": "Microsoft 365 Mail",
            "href": "/o365mail/",
            "destination": "nav",
            "category": "admin",
            "url_route": UI_ROUTE,
        },
    ]
