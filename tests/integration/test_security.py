"""Issue #15 regressions: consent bound to its user, plugin robustness, key rotation, single-flight
refresh across hosts, masking, the access log, and the small error cases. Each test fails on the
code before the fix (the docstrings say how)."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import msal
import pytest
from cryptography.fernet import Fernet

from airflow_provider_o365mail import exceptions as exc
from airflow_provider_o365mail.auth.store import TokenStore
from airflow_provider_o365mail.auth.tokens import TokenManager
from airflow_provider_o365mail.connection import settings_from_connection
from airflow_provider_o365mail.runtime import load_connection

FLOW_PREFIX = "o365mail_consent_flow__"


# ---------------------------------------------------------------------- helpers
@pytest.fixture
def plugin(airflow_services, o365_sandbox, o365_admin):
    callback = f"{airflow_services.api_url}/o365mail/callback"
    o365_admin.add_redirect_uri(o365_sandbox.client_id, callback)
    return airflow_services


def client(services, token: str | None = None) -> httpx.Client:
    cookies = {"_token": token} if token else {}
    return httpx.Client(base_url=services.api_url, cookies=cookies, timeout=60, follow_redirects=False)


def new_db_conn(db_connection, sandbox, conn_id: str, conn_type: str = "o365mail") -> str:
    extra = sandbox.connection_extra()
    del extra["refresh_token"]
    return db_connection(
        conn_id,
        json.dumps(
            {"conn_type": conn_type, "login": sandbox.client_id, "password": sandbox.client_secret, "extra": extra}
        ),
    )


def flow_count() -> int:
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(Variable).filter(Variable.key.like(f"{FLOW_PREFIX}%")).count()


def start_and_sign_in(services, sbx, conn_id: str, starter: str = "admin") -> str:
    with client(services, services.admin_token(starter)) as starting:
        started = starting.post("/o365mail/authorize/" + quote(conn_id, safe=""))
    assert started.status_code == 303, started.text
    return sbx.admin().sign_in(started.headers["location"], login=sbx.user, password=sbx.user_password)


def grant_revoked(admin, sbx) -> bool:
    grants = admin.state()["grants"]
    return any(g["revoked_at"] for g in grants.values() if g["upn"] == sbx.user and g["client_id"] == sbx.client_id)


def refresh_requests(admin) -> int:
    return admin.counters().get("token:refresh_token", 0)


# ---------------------------------------------------------------------- 1. consent bound to its user
def test_callback_needs_the_starting_users_session_and_a_refusal_does_not_use_up_the_flow(
    plugin, db_connection, o365_sandbox
):
    """Before: no cookie skipped the check (the grant landed in the connection); a Viewer's 403 used up the flow."""
    services, sbx = plugin, o365_sandbox
    conn_id = new_db_conn(db_connection, sbx, f"sec_bind_{uuid.uuid4().hex[:6]}")
    redirect = start_and_sign_in(services, sbx, conn_id, starter="op1")  # an Op starts it
    path = redirect.removeprefix(services.api_url)
    with client(services) as anonymous:  # the victim's browser without an Airflow session
        refused = anonymous.get(path)
    assert refused.status_code == 401 and "Sign in to Airflow in this browser" in refused.text, refused.text
    for other in ("viewer1", "admin"):  # a Viewer, and even an Admin who did not start it
        with client(services, services.admin_token(other)) as wrong:
            refused = wrong.get(path)
        assert refused.status_code == 403 and "another Airflow user started it" in refused.text
    assert TokenStore(conn_id).load() is None, "no grant may land in the connection"
    with client(services, services.admin_token("op1")) as owner:
        done = owner.get(path)
    assert done.status_code == 200 and f"authorized for {sbx.user}" in done.text, done.text
    assert TokenStore(conn_id).load() is not None

    # 6. The access log has the callback line but neither the code nor the state.
    query = parse_qs(urlsplit(redirect).query)
    log_text = services.log_text("api-server")
    assert "/o365mail/callback" in log_text
    assert query["code"][0] not in log_text and query["state"][0] not in log_text


def test_the_data_key_is_encrypted_in_the_db_and_redacted_by_airflows_rest_api(plugin, db_connection, o365_sandbox):
    """#21: the data key is a Variable like any other for Airflow: encrypted in the DB, ``***`` in the REST API.

    Written by this process, never read by the api-server: its masker would hide a value it had read itself,
    so only the Variable's name can make the api-server redact it."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session

    services, sbx = plugin, o365_sandbox
    conn_id = db_connection(
        f"sec_dk_{uuid.uuid4().hex[:6]}", sbx.connection_json(refresh_token=sbx.new_refresh_token())
    )
    assert TokenManager(settings_from_connection(load_connection(conn_id))).get().source == "identity_provider"
    store = TokenStore(conn_id)
    with create_session() as session:
        row = session.query(Variable).filter(Variable.key == store.data_key).one()
        value = row.val
        assert row.is_encrypted and value not in row._val, "Airflow's fernet layer"
    token = services.admin_token()
    with client(services, token) as admin:
        shown = admin.get(f"/api/v2/variables/{store.data_key}", headers={"Authorization": f"Bearer {token}"})
        # The listing pages (at most 100 a page): ask for this connection's Variables only.
        listed = admin.get(
            "/api/v2/variables",
            params={"variable_key_pattern": conn_id, "limit": 100},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert shown.status_code == 200 and listed.status_code == 200, shown.text + listed.text
    assert shown.json()["value"] == "***" and shown.json()["is_encrypted"] is True, shown.json()
    assert value not in shown.text and value not in listed.text
    assert store.key in listed.text and store.data_key in listed.text, "the listing has the provider's Variables"


# ---------------------------------------------------------------------- 4. plugin robustness
def test_authorize_refuses_unknown_and_non_o365mail_connections(plugin, db_connection, o365_sandbox):
    """Before: unknown ids raised AirflowNotFoundException (500); an http connection started a flow."""
    services = plugin
    http_id = new_db_conn(db_connection, o365_sandbox, f"sec_http_{uuid.uuid4().hex[:6]}", conn_type="http")
    before = flow_count()
    with client(services, services.admin_token()) as admin:
        unknown = admin.post("/o365mail/authorize/sec-does-not-exist", headers={"Accept": "text/html"})
        assert unknown.status_code == 404 and "There is no connection 'sec-does-not-exist'" in html.unescape(
            unknown.text
        )
        wrong_type = admin.post(f"/o365mail/authorize/{http_id}")
        assert wrong_type.status_code == 400 and "only connections of type 'o365mail'" in html.unescape(wrong_type.text)
    for role_user in ("viewer1",):  # below Op: no Authorize at all
        with client(services, services.admin_token(role_user)) as low:
            assert low.post(f"/o365mail/authorize/{http_id}").status_code == 403
            assert low.get("/o365mail/api/connections").status_code == 403
    assert flow_count() == before, "no flow may start for them"


def test_conn_ids_are_encoded_in_urls_and_ids_with_slashes_can_be_authorized(plugin, db_connection, o365_sandbox):
    """Before: the form posted to /api/v2/variables for this id, and ids with '/' gave 404."""
    services, sbx = plugin, o365_sandbox
    conn_id = new_db_conn(db_connection, sbx, f"sec{uuid.uuid4().hex[:4]}/../../../api/v2/variables")
    with client(services, services.admin_token()) as admin:
        page = admin.get("/o365mail/", headers={"Accept": "text/html"}).text
        actions = re.findall(r"<form method='post' action='([^']+)'>", page)
        expected = "/o365mail/authorize/" + quote(conn_id, safe="")
        assert expected in actions and not any(a.startswith("/api/") for a in actions)
        started = admin.post(expected)
        assert started.status_code == 303 and started.headers["location"].startswith(sbx.authority)
        redirect = sbx.admin().sign_in(started.headers["location"], login=sbx.user, password=sbx.user_password)
        done = admin.get(redirect.removeprefix(services.api_url))
    assert done.status_code == 200 and "authorized" in done.text, done.text
    assert TokenStore(conn_id).load() is not None


# ---------------------------------------------------------------------- 2. key rotation with the real CLI
class IsolatedAirflow:
    """Its own AIRFLOW_HOME and SQLite DB, so rotating the fernet key touches nothing else."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
        self.env.update(
            AIRFLOW_HOME=str(home),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
            O365MAIL_LOCK_DIR=str(home),
        )

    def run(self, *args: str, keys: list[str], check: bool = True) -> subprocess.CompletedProcess:
        env = {**self.env, "AIRFLOW__CORE__FERNET_KEY": ",".join(keys)}
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, cwd=self.home, check=False)
        if check:
            assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
        return result

    def airflow(self, *args: str, keys: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "airflow", *args, keys=keys, check=check)

    def python(self, code: str, keys: list[str]) -> dict:
        result = self.run(sys.executable, "-c", textwrap.dedent(code), keys=keys)
        return {**json.loads(result.stdout.strip().splitlines()[-1]), "log": result.stdout + result.stderr}


TOKEN_PROBE = """
    import json
    from airflow_provider_o365mail.hooks.o365mail import O365MailHook
    t = O365MailHook({conn_id!r}).access_token(force_refresh={force})
    print(json.dumps({{"source": t.source}}))
"""

#: What the metadata DB of an isolated Airflow holds for a connection's store and its data key, and what
#: Airflow's REST API (its VariableResponse serializer) and masker make of them.
STORE_PROBE = """
    import json
    from cryptography.fernet import Fernet
    from airflow._shared.secrets_masker import _secrets_masker
    from airflow.api_fastapi.core_api.datamodels.variables import VariableResponse
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session
    from airflow_provider_o365mail.auth import crypto
    from airflow_provider_o365mail.auth.store import TokenStore

    store = TokenStore({conn_id!r})
    out = {{}}
    with create_session() as session:
        rows = {{r.key: r for r in session.query(Variable).filter(Variable.key.in_([store.key, store.data_key]))}}
        for name, key in (("store", store.key), ("data_key", store.data_key)):
            row = rows.get(key)
            out[name] = row and {{
                "is_encrypted": row.is_encrypted,
                "api_value": VariableResponse.model_validate(row).val,
                "name_is_sensitive": _secrets_masker().should_hide_value_for_key(key),
                "outer_layer_opens_with_old_fernet_key": crypto.try_decrypt(Fernet({old_key!r}), row._val) is not None,
            }}
        raw, data_key = rows[store.key].val, rows.get(store.data_key)
        out["store_opens_with_data_key"] = bool(data_key) and crypto.try_decrypt(Fernet(data_key.val), raw) is not None
        out["store_opens_with_a_derived_key"] = crypto.try_decrypt(crypto.load_cipher(), raw) is not None
    print(json.dumps(out))
"""

#: Rewrite a store as the provider wrote it before 0.2: sealed with a key derived (HKDF) from
#: [core] fernet_key, and no data key.
OLD_SCHEME = """
    import json
    from cryptography.fernet import Fernet
    from airflow.models.variable import Variable
    from airflow_provider_o365mail.auth import crypto
    from airflow_provider_o365mail.auth.store import TokenStore

    store = TokenStore({conn_id!r})
    plaintext = Fernet(Variable.get(store.data_key)).decrypt(Variable.get(store.key).encode())
    Variable.set(store.key, crypto.encrypt(crypto.load_cipher(), plaintext))
    Variable.delete(store.data_key)
    print(json.dumps({{"done": True}}))
"""

ROTATIONS = 4


def revocation(admin, sbx) -> float:
    """When the sandbox user's grant to the app was last revoked (0: never). A grant revoked by an earlier
    test stays revoked for tokens issued before then: compare before and after."""
    grants = admin.state()["grants"].values()
    return max((g["revoked_at"] for g in grants if g["upn"] == sbx.user and g["client_id"] == sbx.client_id), default=0)


def test_airflows_fernet_key_rotation_alone_keeps_every_connection_working(tmp_path, o365_sandbox, o365_admin):
    """#21: Airflow's documented procedure (new,old; ``airflow rotate-fernet-key``; drop old) and no provider
    command, under strict rotation, with refresh tokens rotated several times since consent.

    Before: the provider's inner layer used keys derived from the old fernet key, which rotate-fernet-key does
    not touch: once the old key was dropped the store no longer opened, the connection's original refresh
    token was redeemed again, and strict rotation revoked the grant (AADSTS70008)."""
    sbx, admin = o365_sandbox, o365_admin
    old, new = (Fernet.generate_key().decode() for _ in range(2))
    af = IsolatedAirflow(tmp_path)
    af.airflow("db", "migrate", keys=[old])
    admin.update_settings(strict_rotation=True)  # a second redemption of any refresh token revokes the grant
    revoked_before = revocation(admin, sbx)
    conns = ["sec_rot_a", "sec_rot_b"]
    for conn_id in conns:
        seed = sbx.new_refresh_token()
        af.airflow("connections", "add", conn_id, "--conn-json", sbx.connection_json(refresh_token=seed), keys=[old])
    refreshes = refresh_requests(admin)
    for conn_id in conns:
        for _ in range(ROTATIONS):  # the seed, then each rotated refresh token once
            probe = af.python(TOKEN_PROBE.format(conn_id=conn_id, force=True), keys=[old])
            assert probe["source"] == "identity_provider", probe["log"]
    assert refresh_requests(admin) - refreshes == ROTATIONS * len(conns)

    # 1. the new key first, the old one second, on every component; refreshes go on meanwhile
    probe = af.python(TOKEN_PROBE.format(conn_id=conns[0], force=True), keys=[new, old])
    assert probe["source"] == "identity_provider", probe["log"]
    # 2. Airflow's own re-encryption; 3. the old key removed. Nothing of the provider's was run.
    af.airflow("rotate-fernet-key", keys=[new, old])
    refreshes = refresh_requests(admin)
    for conn_id in conns:
        probe = af.python(TOKEN_PROBE.format(conn_id=conn_id, force=True), keys=[new])
        assert probe["source"] == "identity_provider", probe["log"]
        assert "cannot be decrypted" not in probe["log"], probe["log"]
        assert af.python(TOKEN_PROBE.format(conn_id=conn_id, force=False), keys=[new])["source"] == "store"
    assert refresh_requests(admin) - refreshes == len(conns), "one redemption per forced refresh, no fallback"
    assert revocation(admin, sbx) == revoked_before, "AADSTS70008: a refresh token was redeemed twice"

    for conn_id in conns:
        held = af.python(STORE_PROBE.format(conn_id=conn_id, old_key=old), keys=[new])
        assert held["store_opens_with_data_key"] and not held["store_opens_with_a_derived_key"], held
        data_key = held["data_key"]
        assert data_key["is_encrypted"] and not data_key["outer_layer_opens_with_old_fernet_key"], (
            "stored encrypted, and re-encrypted by airflow rotate-fernet-key"
        )
        assert data_key["name_is_sensitive"] and data_key["api_value"] == "***", "redacted by Airflow's API"
        assert held["store"]["is_encrypted"], held

    doctor = af.airflow("o365mail", "doctor", "--conn-id", conns[1], keys=[new], check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    store_line = next(line for line in doctor.stdout.splitlines() if "token store" in line)
    assert store_line.startswith("[ OK ]") and "rotate-fernet-key" in store_line, doctor.stdout
    assert revocation(admin, sbx) == revoked_before


def test_a_store_written_before_data_keys_moves_to_one_on_read(tmp_path, o365_sandbox, o365_admin):
    """A store sealed with a key derived from [core] fernet_key (the scheme before 0.2) is re-encrypted under a
    new data key by the first read, here during a rotation, and survives the old key's removal."""
    sbx, admin = o365_sandbox, o365_admin
    old, new = (Fernet.generate_key().decode() for _ in range(2))
    af = IsolatedAirflow(tmp_path)
    af.airflow("db", "migrate", keys=[old])
    admin.update_settings(strict_rotation=True)
    revoked_before = revocation(admin, sbx)
    conn_id = "sec_rot_old_scheme"
    af.airflow(
        "connections",
        "add",
        conn_id,
        "--conn-json",
        sbx.connection_json(refresh_token=sbx.new_refresh_token()),
        keys=[old],
    )
    for _ in range(2):
        assert af.python(TOKEN_PROBE.format(conn_id=conn_id, force=True), keys=[old])["source"] == "identity_provider"
    af.python(OLD_SCHEME.format(conn_id=conn_id), keys=[old])
    held = af.python(STORE_PROBE.format(conn_id=conn_id, old_key=old), keys=[old])
    assert held["data_key"] is None and held["store_opens_with_a_derived_key"], held

    af.airflow("rotate-fernet-key", keys=[new, old])
    refreshes = refresh_requests(admin)
    read = af.python(TOKEN_PROBE.format(conn_id=conn_id, force=False), keys=[new, old])
    assert read["source"] == "store" and refresh_requests(admin) == refreshes, "a read, no token request"
    held = af.python(STORE_PROBE.format(conn_id=conn_id, old_key=old), keys=[new, old])
    assert held["store_opens_with_data_key"] and not held["store_opens_with_a_derived_key"], held
    assert held["data_key"]["is_encrypted"] and held["data_key"]["api_value"] == "***", held

    probe = af.python(TOKEN_PROBE.format(conn_id=conn_id, force=True), keys=[new])  # the old key removed
    assert probe["source"] == "identity_provider" and "cannot be decrypted" not in probe["log"], probe["log"]
    assert revocation(admin, sbx) == revoked_before


# ---------------------------------------------------------------------- 3. single-flight refresh across hosts
WORKER = """
    import json, os, random, sys, time
    from pathlib import Path
    from airflow_provider_o365mail.auth.store import TokenStore
    from airflow_provider_o365mail.auth.tokens import TokenManager
    from airflow_provider_o365mail.connection import settings_from_connection
    from airflow_provider_o365mail.runtime import MetadataDbVariables, load_connection

    class JitteryVariables(MetadataDbVariables):
        def set(self, key, value, description="airflow-provider-o365mail"):
            if "refresh_lease" in key:
                time.sleep(random.uniform(0, {jitter}))  # a slow API server / database
            super().set(key, value, description)

    conn_id = {conn_id!r}
    settings = settings_from_connection(load_connection(conn_id))
    manager = TokenManager(settings, TokenStore(conn_id, backend=JitteryVariables()))
    Path(sys.argv[1], "ready-" + str(os.getpid())).touch()
    while not Path(sys.argv[1], "go").exists():
        time.sleep(0.02)
    token = manager.get(force_refresh={force})
    print(json.dumps({{"source": token.source}}))
"""


def run_hosts(tmp_path: Path, conn_id: str, count: int, *, force: bool, jitter: float) -> list[str]:
    """``count`` processes, each with its own lock directory (a host of its own), released together."""
    code = textwrap.dedent(WORKER.format(conn_id=conn_id, force=force, jitter=jitter))
    procs = []
    for index in range(count):
        host = tmp_path / f"host{index}"
        host.mkdir()
        env = {
            **os.environ,
            "O365MAIL_LOCK_DIR": str(host),
            "AIRFLOW__O365MAIL__REFRESH_LEASE_SECONDS": "1",
            # a write here takes up to ``jitter`` s: the guarantee needs a settle longer than that
            "AIRFLOW__O365MAIL__REFRESH_LEASE_SETTLE_SECONDS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    (tmp_path / "go").touch()
    sources = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        sources.append(json.loads(out.strip().splitlines()[-1])["source"])
    return sources


@pytest.fixture
def short_timeout_conn(o365_sandbox, o365_admin, monkeypatch) -> str:
    conn_id = f"o365mail_sec_{uuid.uuid4().hex[:8]}"
    connection = o365_sandbox.connection_json(refresh_token=o365_sandbox.new_refresh_token(), timeout=5)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", connection)
    return conn_id


def test_one_refresh_at_a_time_across_hosts_with_a_slow_idp_and_jittery_lease_writes(
    tmp_path, short_timeout_conn, o365_admin, o365_sandbox
):
    """Five 'hosts' force a refresh each under strict rotation, the IdP answers in 1.5 s and lease writes
    take 0-400 ms: five redemptions one after the other, none of a refresh token twice. Before: the
    write-wait-read check (150 ms) let two claimants both win, and the grant was revoked."""
    o365_admin.update_settings(strict_rotation=True)
    o365_admin.add_fault(status=200, delay=1.5, count=5)
    o365_admin.reset_counters()
    sources = run_hosts(tmp_path, short_timeout_conn, 5, force=True, jitter=0.4)
    assert sources == ["identity_provider"] * 5
    assert refresh_requests(o365_admin) == 5, o365_admin.counters()
    assert not grant_revoked(o365_admin, o365_sandbox)
    assert TokenManager(settings_from_connection(load_connection(short_timeout_conn))).get(force_refresh=True)


def test_a_refresh_longer_than_the_lease_keeps_it(tmp_path, short_timeout_conn, o365_admin, o365_sandbox):
    """The first refresh takes ~16 s (slow 503 with Retry-After 10, then slow success), longer than the
    lease's 14 s: the holder renews it, the others wait and then use the stored token. Before: the lease
    expired under the holder and a second host redeemed the same refresh token."""
    o365_admin.update_settings(strict_rotation=True)
    o365_admin.add_fault(status=503, delay=3, retry_after=10, count=1)
    o365_admin.add_fault(status=200, delay=3, count=1)
    o365_admin.reset_counters()
    sources = run_hosts(tmp_path, short_timeout_conn, 3, force=False, jitter=0.2)
    assert sorted(sources) == ["identity_provider", "store", "store"]
    assert refresh_requests(o365_admin) == 2, o365_admin.counters()
    assert not grant_revoked(o365_admin, o365_sandbox)


def test_retry_after_a_timed_out_request_rereads_the_store(short_timeout_conn, o365_admin):
    """The first request hangs past the 5 s timeout; meanwhile another host's refresh reaches the store.
    The retry reads the store first and uses that token instead of redeeming again. Before: the retry
    redeemed the old refresh token a second time."""
    import threading

    from airflow_provider_o365mail.auth.msal_app import ResponseRecord

    settings = settings_from_connection(load_connection(short_timeout_conn))
    o365_admin.add_fault(status=200, delay=8, count=1)
    o365_admin.reset_counters()

    def other_host() -> None:
        deadline = time.monotonic() + 30
        while o365_admin.state()["faults"] and time.monotonic() < deadline:
            time.sleep(0.1)  # until the main request has taken the slow fault
        helper = TokenManager(settings)
        loaded = helper._load_cache()
        result = helper._acquire(loaded.cache, ResponseRecord())
        assert "access_token" in result
        helper.store.save(loaded.cache.serialize(), loaded.seed, fence=10_000)

    thread = threading.Thread(target=other_host)
    thread.start()
    token = TokenManager(settings, sleep=lambda s: thread.join()).get(force_refresh=True)
    assert token.source == "store", "the retry found the other host's token"
    assert refresh_requests(o365_admin) == 2, o365_admin.counters()


# ---------------------------------------------------------------------- 5. masking
def test_refresh_tokens_from_the_store_and_xoauth2_strings_are_masked(o365mail_conn, o365_sandbox, tmp_path):
    """Before: only the connection's refresh token was registered, not the rotated ones read from the store,
    and no base64 XOAUTH2 string."""
    first = TokenManager(settings_from_connection(load_connection(o365mail_conn))).get()
    assert first.source == "identity_provider"
    cache = msal.SerializableTokenCache()
    cache.deserialize(TokenStore(o365mail_conn).load().msal_cache)
    (rotated,) = [rt["secret"] for rt in cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)]
    secret_file = tmp_path / "rt"
    secret_file.write_text(rotated)
    code = f"""
        import base64, json, sys
        from pathlib import Path
        from urllib.parse import quote
        from airflow.sdk._shared.secrets_masker import redact as sdk_redact
        from airflow._shared.secrets_masker import redact as core_redact
        from airflow_provider_o365mail.hooks.o365mail import O365MailHook
        hook = O365MailHook({o365mail_conn!r})
        token = hook.access_token()
        rt = Path({str(secret_file)!r}).read_text()
        sasl = base64.b64encode(f"user={o365_sandbox.user}\\x01auth=Bearer {{token.token}}\\x01\\x01".encode()).decode()
        forms = {{"rt": rt, "rt_url": quote(rt, safe=""), "rt_b64": base64.b64encode(rt.encode()).decode(), "xoauth2_b64": sasl}}
        print(json.dumps({{"source": token.source, **{{k: [sdk_redact("x " + v + " y") == "x *** y",
              core_redact("x " + v + " y") == "x *** y"] for k, v in forms.items()}}}}))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    masked = json.loads(result.stdout.strip().splitlines()[-1])
    assert masked.pop("source") == "store"
    assert masked == {k: [True, True] for k in ("rt", "rt_url", "rt_b64", "xoauth2_b64")}, masked


# ---------------------------------------------------------------------- 7. small ones
def test_a_wrong_ca_bundle_fails_fast_with_the_fix(o365mail_conn, o365_admin, monkeypatch, tmp_path):
    """Before: retried 4 times and reported as 'unreachable or overloaded'."""
    import certifi

    conn = json.loads(os.environ[f"AIRFLOW_CONN_{o365mail_conn.upper()}"])
    conn["extra"]["ca_bundle"] = certifi.where()  # a real CA list without the sandbox's CA
    monkeypatch.setenv(f"AIRFLOW_CONN_{o365mail_conn.upper()}", json.dumps(conn))
    slept: list[float] = []
    manager = TokenManager(settings_from_connection(load_connection(o365mail_conn)), sleep=slept.append)
    started = time.monotonic()
    with pytest.raises(exc.ConnectionConfigError) as err:
        manager.get()
    assert slept == [] and time.monotonic() - started < 10
    message = str(err.value)
    assert "not trusted by ca_bundle" in message and "Retrying will not help" in message
    assert "unreachable or overloaded" not in message
