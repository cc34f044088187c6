"""Run the Entra ID stand-in over HTTPS: ``python -m airflow_provider_o365mail.testing.entra.server``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import uvicorn

from airflow_provider_o365mail.testing.entra.app import create_app
from airflow_provider_o365mail.testing.entra.directory import Directory
from airflow_provider_o365mail.testing.mail_admin import router as mail_admin_router


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    config = json.loads((args.state_dir / "entra.json").read_text())
    directory = Directory(args.state_dir / "entra", config["tenant_id"], config["tenant_domain"])
    directory.issuer_base = f"https://{args.host}:{args.port}"
    directory.issuer_trust = config.get("ca_file") or True
    app = create_app(directory, config["admin_key"])
    app.include_router(mail_admin_router(args.state_dir, config["admin_key"]))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=config["cert_file"],
        ssl_keyfile=config["key_file"],
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
