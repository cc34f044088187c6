"""The api-server app under ``/o365mail``: connection states, Authorize, and the OAuth2 callback.

Airflow does not authenticate plugin routes, so every route but ``/callback`` depends on
``requires_access_connection("PUT")`` (an authenticated user allowed to edit connections). The
callback completes only for the Airflow user who started the flow, identified by the Airflow
session cookie of the browser that comes back; who it is is checked before the single-use flow
is used up, so a wrong or missing session leaves it for the right user. ``POST /api/check/{id}`` (the
page's Check button) also needs the ``X-O365Mail-Check`` header, which a cross-site form cannot send,
and runs the doctor's checks. The callback's ``code``
and ``state`` are registered with the api-server's masker before the response ends, so Airflow's
access log records them as ``***``. No token ever appears in a page, a URL of ours or a log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from airflow_provider_o365mail.auth.consent import ConsentFlow, store_consent
from airflow_provider_o365mail.auth.last_error import clear_last_error
from airflow_provider_o365mail.auth.masking import mask
from airflow_provider_o365mail.connection import CONN_TYPE, settings_from_connection
from airflow_provider_o365mail.exceptions import ConnectionConfigError, O365MailError
from airflow_provider_o365mail.hooks.doctor import diagnose
from airflow_provider_o365mail.plugins import pages
from airflow_provider_o365mail.plugins.connection_states import all_states, connection_state, discover, source_of
from airflow_provider_o365mail.plugins.flow_store import PendingFlow, consume_flow, peek_flow, save_flow
from airflow_provider_o365mail.runtime import load_connection

log = logging.getLogger(__name__)
CALLBACK_PATH = "/o365mail/callback"
CHECK_HEADER = pages.CHECK_HEADER


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


def create_app() -> FastAPI:
    app = FastAPI(title="airflow-provider-o365mail", docs_url=None, redoc_url=None, openapi_url=None)
    current_user = _user_dependency()

    @app.exception_handler(HTTPException)
    async def _auth_errors(request: Request, exc: HTTPException) -> Any:
        if exc.status_code == 401 and request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"/auth/login?next={quote(request.url.path)}", status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse, dependencies=[_requires_connection_edit()])
    def index(request: Request) -> HTMLResponse:
        return HTMLResponse(pages.index_page(callback_url(request), _states()), headers=_NO_STORE)

    @app.get("/api/connections", dependencies=[_requires_connection_edit()])
    def api_connections() -> JSONResponse:
        return JSONResponse(_states(), headers=_NO_STORE)

    @app.post("/api/check/{connection_id:path}", dependencies=[_requires_connection_edit()])
    def check(connection_id: str, request: Request) -> JSONResponse:
        """The doctor's checks for one connection, then its state again (the check may have changed it)."""
        if request.headers.get(CHECK_HEADER) != "1":  # a cross-site form cannot set it
            return JSONResponse({"detail": f"missing header {CHECK_HEADER}"}, status_code=400, headers=_NO_STORE)
        connection, refusal = _authorizable(connection_id, as_json=True)
        if refusal is not None:
            return refusal
        from airflow.utils.session import create_session

        checks = [c.as_dict() for c in diagnose(connection_id)]
        with create_session() as session:
            state = connection_state(connection, source_of(connection_id, session))
        log.info("Checked connection %s from the UI: %s.", connection_id, ", ".join(c["status"] for c in checks))
        body = {"conn_id": connection_id, "checks": checks, "state": state, "row_html": pages.row_cells(state)}
        return JSONResponse(body, headers=_NO_STORE)

    @app.post("/authorize/{connection_id:path}", dependencies=[_requires_connection_edit()])
    def authorize(connection_id: str, request: Request, user: Any = current_user) -> Response:
        from airflow.utils.session import create_session

        connection, refusal = _authorizable(connection_id)
        if refusal is not None:
            return refusal
        try:
            settings = settings_from_connection(connection)
            if settings.public_client:
                raise ConnectionConfigError(
                    f"Connection {connection_id!r} is a public client (no secret): this page's sign-in returns to a Web "
                    "redirect URI, which Entra ID redeems only with a secret. Authorize it with "
                    f"'airflow o365mail authorize --conn-id {connection_id} --device-code'."
                )
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
        # Before anything can fail: Airflow's access log (written after the response) then shows ***.
        mask(params.get("code"), params.get("state"))
        cookie_user = await _optional_user(request)
        return await asyncio.to_thread(_finish_callback, params, cookie_user)

    return app


def _discovered() -> list[tuple[Any, str]]:
    from airflow.utils.session import create_session

    with create_session() as session:
        return discover(session)


def _states() -> list[dict[str, Any]]:
    return all_states(_discovered())


def _authorizable(connection_id: str, *, as_json: bool = False) -> tuple[Any, Response | None]:
    """The connection, or the answer that says why it cannot be used here (404 unknown, 400 wrong type)."""
    from airflow.exceptions import AirflowNotFoundException

    try:
        connection = load_connection(connection_id)
    except AirflowNotFoundException:
        message = (
            f"There is no connection {connection_id!r}. Create it under Admin > Connections "
            f"(type {CONN_TYPE}), then use Authorize on this page."
        )
        return None, _refusal(connection_id, message, 404, as_json)
    if connection.conn_type != CONN_TYPE:
        message = (
            f"Connection {connection_id!r} has type {connection.conn_type!r}: only connections of type "
            f"{CONN_TYPE!r} can be authorized here."
        )
        return None, _refusal(connection_id, message, 400, as_json)
    return connection, None


def _refusal(connection_id: str, message: str, status_code: int, as_json: bool) -> Response:
    if as_json:
        return JSONResponse({"detail": message}, status_code=status_code, headers=_NO_STORE)
    return HTMLResponse(
        pages.result_page(ok=False, conn_id=connection_id, message=message), status_code=status_code, headers=_NO_STORE
    )


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


SIGN_IN_AGAIN = (
    "Consent refused: {why}. The sign-in can only be completed in the browser where it was started, by the "
    "Airflow user who started it. Sign in to Airflow in this browser as that user, open Microsoft 365 Mail "
    "and click Authorize again (or ask that user to)."
)


def _finish_callback(params: dict[str, str], cookie_user: str | None) -> HTMLResponse:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.utils.session import create_session

    state = params.get("state", "")
    try:
        with create_session() as session:
            pending = peek_flow(state, session=session)
    except O365MailError as err:
        return HTMLResponse(pages.result_page(ok=False, conn_id="?", message=str(err)), status_code=400)
    if cookie_user is None or cookie_user != pending.user_id:
        why = "this browser has no Airflow session" if cookie_user is None else "another Airflow user started it"
        log.warning("Consent callback for %s refused: %s (the flow stays usable by its owner).", pending.conn_id, why)
        return HTMLResponse(
            pages.result_page(ok=False, conn_id=pending.conn_id, message=SIGN_IN_AGAIN.format(why=why)),
            status_code=401 if cookie_user is None else 403,
            headers=_NO_STORE,
        )
    try:
        with create_session() as session:
            pending = consume_flow(state, session=session)
        settings = settings_from_connection(load_connection(pending.conn_id))
        result = ConsentFlow(settings, pending.redirect_uri).finish(pending.flow, params)
        result = store_consent(result)
        clear_last_error(pending.conn_id)
    except AirflowNotFoundException:
        return HTMLResponse(
            pages.result_page(
                ok=False, conn_id=pending.conn_id, message=f"Connection {pending.conn_id!r} was deleted meanwhile."
            ),
            status_code=404,
        )
    except O365MailError as err:
        return HTMLResponse(pages.result_page(ok=False, conn_id=pending.conn_id, message=str(err)), status_code=400)
    where = "the connection and the encrypted token store" if result.connection_updated else "the encrypted token store"
    message = (
        f"Connection {result.conn_id} is authorized for {result.username}. The refresh token was saved in {where}."
    )
    return HTMLResponse(
        pages.result_page(
            ok=True, conn_id=result.conn_id, message=message, scopes=(*result.scopes, *result.also_consented)
        ),
        headers=_NO_STORE,
    )
