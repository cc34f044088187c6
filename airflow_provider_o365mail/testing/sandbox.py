"""Start, describe and stop the whole sandbox: Entra ID stand-in, Dovecot and Postfix.

``up`` is idempotent: it creates what is missing (packages, CA, tenant, configs), starts what is
not running and writes the env file. ``down`` stops every process by its recorded PID.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from airflow_provider_o365mail.testing import mailservers, tls
from airflow_provider_o365mail.testing.admin import SandboxAdmin, tls_session

DEFAULT_STATE_DIR = Path(os.environ.get("O365_SANDBOX_STATE_DIR", f"/tmp/airflow-o365mail-sandbox-{os.getuid()}"))
DOMAIN = "o365.sandbox.test"
DELEGATED_SCOPES = "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send"
APP_ONLY_SCOPE = "https://outlook.office365.com/.default"
GRAPH = "https://graph.microsoft.com"
#: Delegated Graph permissions the sandbox app registration lists and the sandbox user consented to
#: (for the coming Graph transport: send, drafts and upload sessions, shared mailboxes).
GRAPH_DELEGATED_PERMISSIONS = ("Mail.ReadWrite", "Mail.ReadWrite.Shared", "Mail.Send", "Mail.Send.Shared", "User.Read")
GRAPH_DELEGATED_SCOPES = " ".join(f"{GRAPH}/{p}" for p in GRAPH_DELEGATED_PERMISSIONS)
#: Application permissions on Graph with admin consent for the sandbox's daemon app.
GRAPH_APP_ROLES = ("Mail.ReadWrite", "Mail.Send")
GRAPH_APP_ONLY_SCOPE = f"{GRAPH}/.default"
REDIRECT_URI = "http://localhost/o365mail/callback"


@dataclass(frozen=True)
class SandboxInfo:
    """Everything a client needs to use the sandbox; ``env()`` is the env file's content."""

    state_dir: Path
    tenant_id: str
    idp_port: int
    imap_port: int
    smtp_port: int
    ca_file: str
    client_id: str
    client_secret: str = field(repr=False)
    app_client_id: str
    app_client_secret: str = field(repr=False)
    user: str
    user_password: str = field(repr=False)
    second_user: str
    shared_mailbox: str
    admin_key: str = field(repr=False)
    refresh_token: str = field(repr=False)
    graph_port: int = 0

    @property
    def idp_url(self) -> str:
        return f"https://127.0.0.1:{self.idp_port}"

    @property
    def graph_url(self) -> str:
        """The Graph stand-in's root: requests go to ``{graph_url}/v1.0/...`` (empty if it has none)."""
        return f"https://127.0.0.1:{self.graph_port}" if self.graph_port else ""

    @property
    def authority(self) -> str:
        return f"{self.idp_url}/{self.tenant_id}"

    def admin(self) -> SandboxAdmin:
        return SandboxAdmin(
            self.idp_url, self.admin_key, self.ca_file, self.tenant_id, graph_url=self.graph_url or None
        )

    def new_refresh_token(self, upn: str | None = None) -> str:
        """Consent and redeem a fresh authorization code for ``upn`` (default: the sandbox user)."""
        return self.admin().new_refresh_token(
            client_id=self.client_id,
            client_secret=self.client_secret,
            upn=upn or self.user,
            scope=DELEGATED_SCOPES,
            redirect_uri=REDIRECT_URI,
        )

    def connection_extra(self, **overrides: object) -> dict:
        extra = {
            "tenant_id": self.tenant_id,
            "authority": self.authority,
            "grant_type": "authorization_code",
            "mailbox": self.user,
            "refresh_token": self.refresh_token,
            "scopes": DELEGATED_SCOPES,
            "imap_host": "127.0.0.1",
            "imap_port": self.imap_port,
            "smtp_host": "127.0.0.1",
            "smtp_port": self.smtp_port,
            "ca_bundle": self.ca_file,
            "timeout": 30,
        }
        extra.update(overrides)
        return extra

    def connection_json(self, **overrides: object) -> str:
        """The delegated connection, as ``AIRFLOW_CONN_...`` JSON."""
        return json.dumps(
            {
                "conn_type": "o365mail",
                "login": self.client_id,
                "password": self.client_secret,
                "extra": self.connection_extra(**overrides),
            }
        )

    def app_connection_json(self) -> str:
        """The app-only (client credentials) connection, as ``AIRFLOW_CONN_...`` JSON."""
        extra = self.connection_extra(grant_type="client_credentials", scopes=APP_ONLY_SCOPE, refresh_token=None)
        del extra["refresh_token"]
        return json.dumps(
            {"conn_type": "o365mail", "login": self.app_client_id, "password": self.app_client_secret, "extra": extra}
        )

    def env(self) -> dict[str, str]:
        return {
            "O365_SANDBOX_STATE_DIR": str(self.state_dir),
            "O365_SANDBOX_TENANT": self.tenant_id,
            "O365_SANDBOX_AUTHORITY": self.authority,
            "O365_SANDBOX_AUTH_ENDPOINT": f"{self.authority}/oauth2/v2.0/authorize",
            "O365_SANDBOX_TOKEN_ENDPOINT": f"{self.authority}/oauth2/v2.0/token",
            "O365_SANDBOX_CLIENT_ID": self.client_id,
            "O365_SANDBOX_CLIENT_SECRET": self.client_secret,
            "O365_SANDBOX_APP_CLIENT_ID": self.app_client_id,
            "O365_SANDBOX_APP_CLIENT_SECRET": self.app_client_secret,
            "O365_SANDBOX_REDIRECT_URI": REDIRECT_URI,
            "O365_SANDBOX_USER": self.user,
            "O365_SANDBOX_USER_PASSWORD": self.user_password,
            "O365_SANDBOX_SECOND_USER": self.second_user,
            "O365_SANDBOX_SHARED_MAILBOX": self.shared_mailbox,
            "O365_SANDBOX_IMAP_HOST": "127.0.0.1",
            "O365_SANDBOX_IMAP_PORT": str(self.imap_port),
            "O365_SANDBOX_SMTP_HOST": "127.0.0.1",
            "O365_SANDBOX_SMTP_PORT": str(self.smtp_port),
            "O365_SANDBOX_CA_FILE": self.ca_file,
            "O365_SANDBOX_ADMIN_URL": self.idp_url,
            "O365_SANDBOX_GRAPH_URL": self.graph_url,
            "O365_SANDBOX_ADMIN_KEY": self.admin_key,
            "O365_SANDBOX_REFRESH_TOKEN": self.refresh_token,
            "AIRFLOW_CONN_O365MAIL_DEFAULT": self.connection_json(),
            "AIRFLOW_CONN_O365MAIL_APP": self.app_connection_json(),
        }

    @classmethod
    def from_env(cls, env: dict[str, str]) -> SandboxInfo:
        return cls(
            state_dir=Path(env["O365_SANDBOX_STATE_DIR"]),
            tenant_id=env["O365_SANDBOX_TENANT"],
            idp_port=int(env["O365_SANDBOX_ADMIN_URL"].rsplit(":", 1)[1]),
            imap_port=int(env["O365_SANDBOX_IMAP_PORT"]),
            smtp_port=int(env["O365_SANDBOX_SMTP_PORT"]),
            ca_file=env["O365_SANDBOX_CA_FILE"],
            client_id=env["O365_SANDBOX_CLIENT_ID"],
            client_secret=env["O365_SANDBOX_CLIENT_SECRET"],
            app_client_id=env["O365_SANDBOX_APP_CLIENT_ID"],
            app_client_secret=env["O365_SANDBOX_APP_CLIENT_SECRET"],
            user=env["O365_SANDBOX_USER"],
            user_password=env["O365_SANDBOX_USER_PASSWORD"],
            second_user=env["O365_SANDBOX_SECOND_USER"],
            shared_mailbox=env["O365_SANDBOX_SHARED_MAILBOX"],
            admin_key=env["O365_SANDBOX_ADMIN_KEY"],
            refresh_token=env["O365_SANDBOX_REFRESH_TOKEN"],
            graph_port=int(env["O365_SANDBOX_GRAPH_URL"].rsplit(":", 1)[1]) if env.get("O365_SANDBOX_GRAPH_URL") else 0,
        )


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """``KEY='value'`` lines: a shell can ``source`` them, :func:`read_env_file` parses them."""
    lines = []
    for key, value in values.items():
        if "'" in value or "\n" in value:
            raise ValueError(f"{key} cannot be written to an env file safely")
        lines.append(f"{key}='{value}'\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(lines)


def read_env_file(path: Path | str) -> dict[str, str]:
    values = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip().removeprefix("export ").strip()] = value
    return values


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, what: str, log: Path | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s\n{tail}")


class Sandbox:
    """The sandbox living in ``state_dir``."""

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.state_dir = Path(state_dir)
        self.config_file = self.state_dir / "sandbox.json"
        self.idp_pid_file = self.state_dir / "entra.pid"
        self.graph_pid_file = self.state_dir / "graph.pid"

    # ------------------------------------------------------------------ configuration
    def _create_config(self) -> dict:
        certs = tls.ensure_certificates(self.state_dir / "tls")
        tenant_id = str(uuid.uuid4())
        config = {
            "tenant_id": tenant_id,
            "tenant_domain": DOMAIN,
            "admin_key": secrets.token_urlsafe(24),
            "cert_file": str(certs.cert_file),
            "key_file": str(certs.key_file),
            "ca_file": str(certs.ca_file),
            "idp_port": _free_port(),
            "imap_port": _free_port(),
            "smtp_port": _free_port(),
            "lmtp_port": _free_port(),
            "milter_port": _free_port(),
            "graph_port": _free_port(),
            "graph_upload_port": _free_port("127.0.0.2"),
            "client_id": str(uuid.uuid4()),
            "app_client_id": str(uuid.uuid4()),
            "user": f"alex@{DOMAIN}",
            "second_user": f"blair@{DOMAIN}",
            "shared_mailbox": f"shared@{DOMAIN}",
            "user_password": secrets.token_urlsafe(12),
        }
        self._seed_directory(config)
        return config

    def _seed_directory(self, config: dict) -> None:
        from airflow_provider_o365mail.testing.entra.directory import App, Directory, Secret

        directory = Directory(self.state_dir / "entra", config["tenant_id"], DOMAIN)
        directory.add_user(config["user"], "Alex Sandbox", config["user_password"], auto_approve=True)
        directory.add_user(config["second_user"], "Blair Sandbox", config["user_password"])
        directory.add_user(config["shared_mailbox"], "Shared Mailbox", secrets.token_urlsafe(24))
        year = 365 * 86400
        secret = Secret(str(uuid.uuid4()), f"sbx~{secrets.token_urlsafe(30)}", time.time() + 2 * year)
        app_secret = Secret(str(uuid.uuid4()), f"sbx~{secrets.token_urlsafe(30)}", time.time() + 2 * year)
        directory.add_app(
            App(
                client_id=config["client_id"],
                name="Airflow O365 Mail (sandbox)",
                redirect_uris=[REDIRECT_URI],
                delegated_permissions={
                    "https://outlook.office.com": ["IMAP.AccessAsUser.All", "SMTP.Send"],
                    GRAPH: list(GRAPH_DELEGATED_PERMISSIONS),
                },
                secrets=[secret],
            )
        )
        directory.add_app(
            App(
                client_id=config["app_client_id"],
                name="Airflow O365 Mail daemon (sandbox)",
                redirect_uris=[],
                delegated_permissions={},
                secrets=[app_secret],
                app_roles={
                    "https://outlook.office.com": ["IMAP.AccessAsApp", "SMTP.SendAsApp"],
                    GRAPH: list(GRAPH_APP_ROLES),
                },
                mailbox_permissions=[config["user"]],
            )
        )
        directory.grant_consent(
            config["user"], config["client_id"], "https://outlook.office.com", ["IMAP.AccessAsUser.All", "SMTP.Send"]
        )
        directory.grant_consent(config["user"], config["client_id"], GRAPH, list(GRAPH_DELEGATED_PERMISSIONS))
        config["client_secret"] = secret.value
        config["app_client_secret"] = app_secret.value

    def _load_config(self) -> dict:
        if self.config_file.exists():
            config = json.loads(self.config_file.read_text())
            if "milter_port" not in config:  # a state directory from before the milter
                config["milter_port"] = _free_port()
                self.config_file.write_text(json.dumps(config, indent=1))
            if "graph_port" not in config:  # from before the Graph stand-in: its ports, its permissions at `up`
                config.update(graph_port=_free_port(), graph_upload_port=_free_port("127.0.0.2"), graph_migrate=True)
                self.config_file.write_text(json.dumps(config, indent=1))
            return config
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)  # the mail daemons' users must traverse it
        config = self._create_config()
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh, indent=1)
        (self.state_dir / "entra.json").write_text(json.dumps(config))
        (self.state_dir / "entra.json").chmod(0o600)
        return config

    def mail_config(self, config: dict) -> mailservers.MailServerConfig:
        return mailservers.MailServerConfig(
            root=self.state_dir,
            domain=DOMAIN,
            mailboxes=(
                mailservers.Mailbox(config["user"]),
                mailservers.Mailbox(config["second_user"]),
                mailservers.Mailbox(config["shared_mailbox"], send_as=(config["user"],)),
            ),
            imap_port=config["imap_port"],
            smtp_port=config["smtp_port"],
            lmtp_port=config["lmtp_port"],
            milter_port=config.get("milter_port", 0),
            introspection_url=f"https://127.0.0.1:{config['idp_port']}/_sandbox/exchange/introspect",
            ca_file=Path(config["ca_file"]),
            cert_file=Path(config["cert_file"]),
            key_file=Path(config["key_file"]),
        )

    # ------------------------------------------------------------------ processes
    @staticmethod
    def _pid_in(pid_file: Path) -> int | None:
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def _idp_pid(self) -> int | None:
        return self._pid_in(self.idp_pid_file)

    def _graph_pid(self) -> int | None:
        return self._pid_in(self.graph_pid_file)

    def _start_service(
        self, what: str, name: str, module_args: list[str], pid_file: Path, health_url: str, ca_file: str
    ) -> None:
        """Start ``python -m <module_args>`` (unless its PID file names a live process) and wait for its health URL."""
        process = None
        log_file = self.state_dir / f"{name}.log"
        if self._pid_in(pid_file) is None:
            with open(log_file, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", *module_args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    cwd=self.state_dir,
                )
            pid_file.write_text(str(process.pid))
        session = tls_session(ca_file)
        deadline = time.monotonic() + 30
        while True:
            try:
                session.get(health_url, timeout=2).raise_for_status()
                return
            except (requests.RequestException, ssl.SSLError):
                died = process is not None and process.poll() is not None
                if died or time.monotonic() > deadline or self._pid_in(pid_file) is None:
                    tail = log_file.read_text()[-3000:]
                    raise RuntimeError(f"{what} did not start:\n{tail}") from None
                time.sleep(0.1)

    def _start_idp(self, config: dict) -> None:
        self._start_service(
            "the Entra ID stand-in",
            "entra",
            [
                "airflow_provider_o365mail.testing.entra.server",
                "--state-dir",
                str(self.state_dir),
                "--port",
                str(config["idp_port"]),
            ],
            self.idp_pid_file,
            f"https://127.0.0.1:{config['idp_port']}/_sandbox/health",
            config["ca_file"],
        )

    def _start_graph(self, config: dict) -> None:
        self._start_service(
            "the Microsoft Graph stand-in",
            "graph",
            ["airflow_provider_o365mail.testing.graph.server", "--state-dir", str(self.state_dir)],
            self.graph_pid_file,
            f"https://127.0.0.1:{config['graph_port']}/_sandbox/health",
            config["ca_file"],
        )

    def _migrate_graph_permissions(self, config: dict) -> None:
        """A tenant created before the Graph stand-in gets the Graph permissions a new one is seeded with."""
        if not config.get("graph_migrate"):
            return
        admin = SandboxAdmin(
            f"https://127.0.0.1:{config['idp_port']}", config["admin_key"], config["ca_file"], config["tenant_id"]
        )
        admin.set_delegated_permissions(config["client_id"], GRAPH, list(GRAPH_DELEGATED_PERMISSIONS))
        admin.set_app_roles(config["app_client_id"], GRAPH, list(GRAPH_APP_ROLES))
        admin.consent(config["user"], config["client_id"], GRAPH_DELEGATED_SCOPES)
        del config["graph_migrate"]
        self.config_file.write_text(json.dumps(config, indent=1))

    def _check_traversable(self) -> None:
        """Dovecot and Postfix run as their own users: every parent of the state dir must be searchable."""
        for parent in self.state_dir.resolve().parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                raise RuntimeError(
                    f"{parent} is not searchable by other users (mode {oct(parent.stat().st_mode & 0o777)}), so the "
                    f"mail daemons cannot reach {self.state_dir}. Choose a --state-dir under /tmp or /var/tmp."
                )

    def up(self, env_file: Path | None = None) -> SandboxInfo:
        self._check_traversable()
        missing = mailservers.missing_packages()
        if missing:
            mailservers.install_packages(missing)
        config = self._load_config()
        self._start_idp(config)
        mail = self.mail_config(config)
        mailservers.write_configs(mail)
        mailservers.start_dovecot(mail)
        mailservers.start_milter(mail)
        mailservers.start_postfix(mail)
        _wait_for_port(config["imap_port"], "Dovecot IMAP", mail.dovecot_dir / "dovecot.log")
        _wait_for_port(config["smtp_port"], "Postfix submission", mail.postfix_dir / "postfix.log")
        self._migrate_graph_permissions(config)
        self._start_graph(config)
        info = self._info(config)
        if env_file is not None:
            write_env_file(Path(env_file), info.env())
        return info

    def _info(self, config: dict) -> SandboxInfo:
        partial = SandboxInfo(
            state_dir=self.state_dir,
            tenant_id=config["tenant_id"],
            idp_port=config["idp_port"],
            imap_port=config["imap_port"],
            smtp_port=config["smtp_port"],
            ca_file=config["ca_file"],
            client_id=config["client_id"],
            client_secret=config["client_secret"],
            app_client_id=config["app_client_id"],
            app_client_secret=config["app_client_secret"],
            user=config["user"],
            user_password=config["user_password"],
            second_user=config["second_user"],
            shared_mailbox=config["shared_mailbox"],
            admin_key=config["admin_key"],
            refresh_token="",
            graph_port=config["graph_port"],
        )
        refresh_token = partial.admin().new_refresh_token(
            client_id=config["client_id"],
            client_secret=config["client_secret"],
            upn=config["user"],
            scope=DELEGATED_SCOPES,
            redirect_uri=REDIRECT_URI,
        )
        return SandboxInfo(**{**partial.__dict__, "refresh_token": refresh_token})

    def running(self) -> dict[str, int | None]:
        if not self.config_file.exists():
            return {"entra": None, "graph": None, "dovecot": None, "postfix": None, "milter": None}
        mail = self.mail_config(json.loads(self.config_file.read_text()))
        return {
            "entra": self._idp_pid(),
            "graph": self._graph_pid(),
            "dovecot": mailservers.dovecot_pid(mail),
            "postfix": mailservers.postfix_pid(mail),
            "milter": mailservers.milter_pid(mail),
        }

    def _stop_service(self, pid_file: Path) -> None:
        pid = self._pid_in(pid_file)
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._pid_in(pid_file) is not None:
                time.sleep(0.05)
            if self._pid_in(pid_file) is not None:
                os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)

    def down(self, purge: bool = False) -> None:
        self._stop_service(self.graph_pid_file)
        if self.config_file.exists():
            mail = self.mail_config(json.loads(self.config_file.read_text()))
            mailservers.stop(mail)
        self._stop_service(self.idp_pid_file)
        if purge:
            import shutil

            shutil.rmtree(self.state_dir, ignore_errors=True)

    def restart_graph(self) -> None:
        """Stop and start the Graph stand-in: what it keeps on disk (delta tokens) survives, the rest
        (settings, faults, counters, drafts) starts from the defaults."""
        config = json.loads(self.config_file.read_text())
        self._stop_service(self.graph_pid_file)
        self._start_graph(config)

    def clean_mailboxes(self) -> None:
        mailservers.clean_mailboxes(self.mail_config(json.loads(self.config_file.read_text())))

    def imap_sessions(self, user: str) -> int:
        """How many IMAP connections ``user`` holds on the sandbox's Dovecot right now."""
        return len(self._imap_session_pids(user))

    def imap_idle_sessions(self, user: str, folder: str) -> int:
        """How many of ``user``'s IMAP connections are in IDLE on ``folder`` right now (an ASCII name).

        Dovecot watches the folder's Maildir with inotify while a session IDLEs on it, and only then
        (the watch goes at ``DONE``): the session processes (``doveadm who``) holding an inotify watch
        on the folder's ``new`` directory are its IDLE connections. Reads Dovecot's /proc entries
        (Linux, the sandbox's user).
        """
        cfg = self.mail_config(json.loads(self.config_file.read_text()))
        maildir = cfg.mail_dir / user.lower() / "Maildir"
        if folder.upper() != "INBOX":
            maildir = maildir / ("." + folder.replace("/", "."))
        st = (maildir / "new").stat()
        watch = f"ino:{st.st_ino:x} sdev:{(os.major(st.st_dev) << 20) | os.minor(st.st_dev):x} "
        idling = 0
        for pid in self._imap_session_pids(user):
            try:
                infos = [p.read_text() for p in Path(f"/proc/{pid}/fdinfo").iterdir()]
            except OSError:  # the session ended meanwhile
                continue
            idling += any(line.startswith("inotify ") and watch in line for info in infos for line in info.splitlines())
        return idling

    def _imap_session_pids(self, user: str) -> list[int]:
        cfg = self.mail_config(json.loads(self.config_file.read_text()))
        out = subprocess.run(
            ["doveadm", "-c", str(cfg.dovecot_conf), "who", "-1"], capture_output=True, text=True, check=True
        ).stdout
        return [int(line.split()[2]) for line in out.splitlines()[1:] if line.split()[:2] == [user, "imap"]]
