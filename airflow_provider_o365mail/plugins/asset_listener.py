"""Record, in the same transaction as the asset event, which messages a mail watcher has reported.

The shared-stream ack (``advance``) reaches the trigger one state sync after Airflow stored the
events; a triggerer killed in between would report those messages again after its restart. This
listener runs in the triggerer's supervisor while the asset event is being stored and adds the
message's identity (folder, UIDVALIDITY, UID) to the asset's state (key ``o365mail_emitted``) in the same database session, so the
record exists exactly when the event does. The event trigger skips recorded messages on restart.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.listeners import hookimpl

from airflow_provider_o365mail.event_state import EMITTED_KEPT, EMITTED_KEY, SOURCE_MARKER, emitted_id

log = logging.getLogger(__name__)


def _payload(asset_event: Any) -> dict | None:
    extra = getattr(asset_event, "extra", None) or {}
    payload = extra.get("payload") if isinstance(extra, dict) else None
    if not extra.get("from_trigger") or not isinstance(payload, dict) or payload.get("source") != SOURCE_MARKER:
        return None
    return payload


@hookimpl
def on_asset_event_emitted(asset_event: Any) -> None:
    payload = _payload(asset_event)
    if payload is None or emitted_id(payload) is None:
        return
    try:
        from airflow import settings
        from airflow.models.asset import AssetModel
        from airflow.models.asset_state_store import AssetStateStoreModel
        from sqlalchemy import select

        session = settings.Session()  # the scoped session that is storing the asset event
        asset = asset_event.asset
        asset_id = session.scalar(
            select(AssetModel.id).where(AssetModel.name == asset.name, AssetModel.uri == asset.uri)
        )
        if asset_id is None:
            return
        row = session.get(AssetStateStoreModel, (asset_id, EMITTED_KEY))
        emitted = json.loads(row.value) if row is not None else []
        emitted = [*emitted, emitted_id(payload)][-EMITTED_KEPT:]
        if row is None:
            session.add(
                AssetStateStoreModel(
                    asset_id=asset_id, key=EMITTED_KEY, value=json.dumps(emitted), last_updated_by_kind="watcher"
                )
            )
        else:
            row.value = json.dumps(emitted)
        session.flush()
    except Exception as err:  # never break Airflow's event handling
        log.warning("Could not record the reported message for %s: %s", getattr(asset_event, "asset", None), err)
