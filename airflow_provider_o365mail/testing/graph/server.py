"""Run the Graph stand-in: ``python -m airflow_provider_o365mail.testing.graph.server --state-dir DIR``.

One process, two HTTPS listeners with the sandbox's certificate: Graph on ``127.0.0.1:<graph_port>``
(``/v1.0/...`` and the admin API) and the upload host on ``127.0.0.2:<graph_upload_port>`` (the
``uploadUrl``s, which Microsoft serves from outlook.office.com, not from Graph's host).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette

from airflow_provider_o365mail.testing.admin import tls_session
from airflow_provider_o365mail.testing.graph import admin_api, api, upload_host
from airflow_provider_o365mail.testing.graph.delta import DeltaStore
from airflow_provider_o365mail.testing.graph.drafts import DraftStore
from airflow_provider_o365mail.testing.graph.faults import FaultQueue
from airflow_provider_o365mail.testing.graph.gateway import Gateway
from airflow_provider_o365mail.testing.graph.ids import IdCodec
from airflow_provider_o365mail.testing.graph.limits import Limits
from airflow_provider_o365mail.testing.graph.mailstore import MailStore
from airflow_provider_o365mail.testing.graph.reader import MailReader
from airflow_provider_o365mail.testing.graph.responses import TransportCapture
from airflow_provider_o365mail.testing.graph.service import GraphService
from airflow_provider_o365mail.testing.graph.settings import GraphSettings
from airflow_provider_o365mail.testing.graph.tenant import MailboxSettings, Tenant
from airflow_provider_o365mail.testing.graph.tokens import TokenVerifier, jwks_keys
from airflow_provider_o365mail.testing.graph.uploads import UploadBook

GRAPH_HOST = "127.0.0.1"
UPLOAD_HOST = "127.0.0.2"


class HostDispatch:
    """Route by the local address the connection came in on: Graph's host or the upload host."""

    def __init__(self, graph: Any, uploads: Any) -> None:
        self.graph, self.uploads = graph, uploads

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        server = scope.get("server") or (GRAPH_HOST, 0)
        target = self.uploads if server[0] == UPLOAD_HOST else self.graph
        await target(scope, receive, send)


def build_app(state_dir: Path) -> tuple[Any, dict]:
    from airflow_provider_o365mail.testing.sandbox import Sandbox

    sandbox = Sandbox(state_dir)
    config = json.loads(sandbox.config_file.read_text())
    mail = sandbox.mail_config(config)
    seed = {m.address: MailboxSettings(send_as=list(m.send_as), full_access=list(m.send_as)) for m in mail.mailboxes}
    tenant = Tenant(state_dir / "entra" / "directory.json", config["tenant_domain"], seed)
    idp = f"https://127.0.0.1:{config['idp_port']}"

    def fetch_keys() -> dict[str, Any]:
        session = tls_session(config["ca_file"])
        try:
            response = session.get(f"{idp}/{config['tenant_id']}/discovery/v2.0/keys", timeout=10)
            response.raise_for_status()
            return jwks_keys(response.json())
        finally:
            session.close()

    secrets_file = state_dir / "entra" / "issued-secrets.txt"

    def record_secret(secret: str) -> None:
        fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(secret + "\n")

    settings, limits, faults, uploads = GraphSettings(), Limits(), FaultQueue(), UploadBook()
    gateway = Gateway(limits, faults)
    store, drafts = MailStore(mail), DraftStore(state_dir / "graph" / "spool")
    reader = MailReader(
        store,
        drafts,
        settings,
        IdCodec(config["admin_key"]),
        DeltaStore(state_dir / "graph" / "delta", settings.delta_token_cache),
    )
    service = GraphService(
        tenant,
        store,
        drafts,
        uploads,
        settings,
        tenant_id=config["tenant_id"],
        id_domain=f"graph.{config['tenant_domain']}",
        record_secret=record_secret,
        reader=reader,
    )
    verifier = TokenVerifier(config["tenant_id"], fetch_keys, tenant.now)
    upload_root = f"https://{UPLOAD_HOST}:{config['graph_upload_port']}"
    graph_routes, catch_all = api.routes(verifier, service, gateway, settings, lambda: upload_root)
    admin_routes = admin_api.routes(config["admin_key"], service, settings, limits, faults, gateway)
    graph_app = Starlette(routes=[*graph_routes, *admin_routes, catch_all])
    upload_app = Starlette(
        routes=upload_host.routes(service, uploads, gateway, settings, tenant.now, lambda: f"{upload_root}/api/v2.0")
    )
    return TransportCapture(HostDispatch(graph_app, upload_app)), config


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app, config = build_app(args.state_dir)
    sockets = [_listen(GRAPH_HOST, config["graph_port"]), _listen(UPLOAD_HOST, config["graph_upload_port"])]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            ssl_certfile=config["cert_file"],
            ssl_keyfile=config["key_file"],
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
