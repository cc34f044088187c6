"""Re-encrypt every token store and consent flow in progress (``airflow o365mail rotate-keys``).

Not needed for Airflow's own fernet key rotation: a store is encrypted with its data key, which
``airflow rotate-fernet-key`` re-encrypts (:mod:`.store`). What it does:

- moves every store written before 0.2 (keys derived from ``[core] fernet_key``) to its data key,
  so the old fernet key can be removed even for stores no process has read since the upgrade;
- with ``[o365mail] token_cache_keys = new,old``: re-encrypts every store under ``new`` (run it
  before removing ``old``);
- re-encrypts the consent flows in progress (ten minutes at most) under the newest key.

Each store is rewritten holding its refresh lock, so a concurrent refresh is never overwritten with
older content. Needs the metadata DB (it lists the Variables).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from airflow_provider_o365mail.auth import crypto
from airflow_provider_o365mail.auth.store import LEGACY_STORE_PREFIX, STORE_PREFIX, TokenStore
from airflow_provider_o365mail.exceptions import TokenStoreError

FLOW_PREFIX = "o365mail_consent_flow__"


@dataclass
class RotationReport:
    reencrypted: list[str] = field(default_factory=list)
    current: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    flows: int = 0


def rotate_all(*, lock_timeout: float = 120.0) -> RotationReport:
    """Re-encrypt the token store of every connection, and the consent flows in progress."""
    from airflow.models.variable import Variable
    from airflow.utils.session import create_session

    report = RotationReport()
    with create_session() as session:
        conn_ids = {
            key[len(prefix) :]
            for prefix in (STORE_PREFIX, LEGACY_STORE_PREFIX)
            for (key,) in session.query(Variable.key).filter(Variable.key.like(f"{prefix}%")).all()
        }
    for conn_id in sorted(conn_ids):
        store = TokenStore(conn_id)
        try:
            with store.refresh_lock(timeout=lock_timeout):
                changed = store.reencrypt()
        except TokenStoreError as err:
            report.failed[conn_id] = str(err)
            continue
        (report.reencrypted if changed else report.current).append(conn_id)
    cipher = crypto.load_cipher()
    with create_session() as session:
        for row in session.query(Variable).filter(Variable.key.like(f"{FLOW_PREFIX}%")).all():
            try:
                row.val = crypto.reencrypt(cipher, row.val)
                report.flows += 1
            except TokenStoreError:
                session.delete(row)  # unreadable: it could never be finished anyway
    return report
