"""The api-server app under ``/o365mail``: connection states, Authorize, and the OAuth2 callback.

Airflow does not authenticate plugin routes, so every route but ``/callback`` depends on
``requires_access_connection("PUT")`` (an authenticated user allowed to edit connections). The
callback trusts nothing but a valid, unexpired, unused state bound to the user who started it.
No token ever appears in a page, a URL of ours or a log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from airflow_provider_o365mail.auth.consent import ConsentFlow, store_consent
from airflow_provider_o365mail.auth.last_error import clear_last_error, read_last_error
from airflow_provider_o365mail.auth.token_status import describe_store
from airflow_provider_o365mail.connection import CONN_TYPE, load_connection, settings_from_connection
from airflow_provider_o365mail.exceptions import O365MailError
from airflow_provider_o365mail.plugins import pages
from airflow_provider_o365mail.plugins.flow_store import PendingFlow, consume_flow, save_flow

log = logging.getLogger(__name__)
CALLBACK_PATH = "/o365mail/callback"


def _requires_connection_edit() -> Any:
    from airflow.api_fastapi.core_api.security import requires_access_connection

    return Depends(requires_access_connection("PUT"))


def _user_dependency() -> Any:
    from airflow.api_fastapi.core_api.security import get_user

    return Depends(get_user)


def callback_url(request: Request) -> str:
    from airflow.configuration import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    if not base:
        base = str(request.base_url).rstrip("/")
        base = base[: -len("/o365mail")] if base.endswith("/o365mail") else base
    return base + CALLBACK_PATH


def _o365_connections(session: Any) -> list[Any]:
    from airflow.models.connection import Connection

    return session.query(Connection).filter(Connection.conn_type == CONN_TYPE).order_by(Connection.conn_id).all()


def connection_state(conn: Any) -> dict[str, Any]:
    """What the page shows for one connection (no secrets)."""
    row: dict[str, Any] = {"conn_id": conn.conn_id, "mailbox": None, "grant_type": None}
    try:
        settings = settings_from_connection(conn)
    except O365MailError as err:
        return {**row, "state": "misconfigured", "state_text": str(err)[:300], "last_error": None}
    row.update(mailbox=settings.mailbox, grant_type=settings.grant_type, last_error=read_last_error(conn.conn_id))
    if not settings.delegated:
        return {**row, "state": "app-only", "state_text": "app-only (client credentials): no consent needed"}
    try:
        status = describe_store(settings)
    except O365MailError as err:
        return {**row, "state": "store-unreadable", "state_text": f"token store unreadable: {err}"[:300]}
    if status["account"]:
        minutes = status["access_token_minutes_left"]
        text = f"authorized for {status['account']}"
        if minutes is not None:
            text += f"; access token valid for {max(0, minutes):.0f} min" if minutes > 0 else "; access token expired"
        return {**row, "state": "authorized", "state_text": text}
    if settings.refresh_token:
        return {**row, "state": "authorized", "state_text": "refresh token present; token store not used yet"}
    return {**row, "state": "needs-consent", "state_text": "needs consent: click Authorize"}


def create_app() -> FastAPI:
    app = FastAPI(title="airflow-provider-o365mail", docs_url=None, redoc_url=None, openapi_url=None)
    current_user = _user_dependency()

    @app.exception_handler(HTTPException)
    async def _auth_errors(request: Request, exc: HTTPException) -> Any:
        if exc.status_code == 401 and request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"/auth/login?next={request.url.path}", status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse, dependencies=[_requires_connection_edit()])
    def index(request: Request) -> HTMLResponse:
        from airflow.utils.session import create_session

        with create_session() as session:
            states = [connection_state(conn) for conn in _o365_connections(session)]
        return HTMLResponse(pages.index_page(callback_url(request), states), headers=_NO_STORE)

    @app.get("/api/connections", dependencies=[_requires_connection_edit()])
    def api_connections() -> JSONResponse:
        from airflow.utils.session import create_session

        with create_session() as session:
            return JSONResponse([connection_state(conn) for conn in _o365_connections(session)], headers=_NO_STORE)

    @app.post("/authorize/{connection_id}", dependencies=[_requires_connection_edit()])
    def authorize(connection_id: str, request: Request, user: Any = current_user) -> Response:
        from airflow.utils.session import create_session

        try:
            settings = settings_from_connection(load_connection(connection_id))
            redirect_uri = callback_url(request)
            flow = ConsentFlow(settings, redirect_uri).start()
        except O365MailError as err:
            return HTMLResponse(pages.result_page(ok=False, conn_id=connection_id, message=str(err)), status_code=400)
        with create_session() as session:
            save_flow(
                PendingFlow(
                    conn_id=connection_id,
                    user_id=str(user.get_id()),
                    redirect_uri=redirect_uri,
                    created_at=time.time(),
                    flow=flow,
                ),
                session=session,
            )
        log.info("Consent for %s started by %s.", connection_id, user.get_name())
        return RedirectResponse(flow["auth_uri"], status_code=303, headers=_NO_STORE)

    @app.get("/callback", response_class=HTMLResponse)
    async def callback(request: Request) -> HTMLResponse:
        params = dict(request.query_params)
        cookie_user = await _optional_user(request)
        return await asyncio.to_thread(_finish_callback, params, cookie_user)

    return app


_NO_STORE = {"Cache-Control": "no-store"}


async def _optional_user(request: Request) -> str | None:
    from airflow.api_fastapi.core_api.security import resolve_user_from_token

    token = request.cookies.get("_token")
    if not token:
        return None
    try:
        return str((await resolve_user_from_token(token)).get_id())
    except HTTPException:
        return None


def _finish_callback(params: dict[str, str], cookie_user: str | None) -> HTMLResponse:
    from airflow.utils.session import create_session

    state = params.get("state", "")
    try:
        with create_session() as session:
            pending = consume_flow(state, session=session)
    except O365MailError as err:
        return HTMLResponse(pages.result_page(ok=False, conn_id="?", message=str(err)), status_code=400)
    if cookie_user is not None and cookie_user != pending.user_id:
        return HTMLResponse(
            pages.result_page(
                ok=False,
                conn_id=pending.conn_id,
                message="Consent refused: this sign-in was started by another Airflow user. Start it again yourself.",
            ),
            status_code=403,
        )
    try:
        settings = settings_from_connection(load_connection(pending.conn_id))
        result = ConsentFlow(settings, pending.redirect_uri).finish(pending.flow, params)
        result = store_consent(result)
        clear_last_error(pending.conn_id)
    except O365MailError as err:
        return HTMLResponse(pages.result_page(ok=False, conn_id=pending.conn_id, message=str(err)), status_code=400)
    where = "the connection and the encrypted token store" if result.connection_updated else "the encrypted token store"
    message = (
        f"Connection {result.conn_id} is authorized for {result.username}. The refresh token was saved in {where}."
    )
    return HTMLResponse(
        pages.result_page(ok=True, conn_id=result.conn_id, message=message, scopes=result.scopes), headers=_NO_STORE
    )
