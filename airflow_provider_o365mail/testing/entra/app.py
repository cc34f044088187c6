"""HTTP face of the Entra ID stand-in: Microsoft's v2 endpoints plus a sandbox admin API.

Public paths mirror ``login.microsoftonline.com``; the admin and Exchange-side paths live under
``/_sandbox/`` and are the sandbox's own.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import uuid
from dataclasses import asdict
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from airflow_provider_o365mail.testing.entra import errors, pages, scopes
from airflow_provider_o365mail.testing.entra.device_flow import DEVICE_CODE_GRANT, DeviceFlows
from airflow_provider_o365mail.testing.entra.directory import Directory, Fault, FederatedCredential
from airflow_provider_o365mail.testing.entra.errors import AadstsError

FLOW_LIFETIME = 900


def _error_response(error: AadstsError) -> JSONResponse:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if error.status == 429:
        headers["Retry-After"] = "5"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_app(directory: Directory, admin_key: str) -> FastAPI:
    app = FastAPI(title="Entra ID sandbox", docs_url=None, redoc_url=None, openapi_url=None)
    pending: dict[str, dict[str, Any]] = {}
    device_flows = DeviceFlows(directory)

    def base(request: Request) -> str:
        return f"https://{request.url.netloc}"

    def check_tenant(tenant: str) -> None:
        if not directory.knows_tenant(tenant):
            raise errors.tenant_not_found(tenant)

    @app.exception_handler(AadstsError)
    async def _aadsts(_: Request, exc: AadstsError) -> JSONResponse:
        return _error_response(exc)

    # ------------------------------------------------------------------ discovery
    @app.get("/{tenant}/v2.0/.well-known/openid-configuration")
    async def openid_configuration(tenant: str, request: Request) -> JSONResponse:
        check_tenant(tenant)
        directory.count("discovery")
        root = f"{base(request)}/{tenant}"
        issuer_tenant = "{tenantid}" if tenant in ("common", "organizations") else directory.tenant_id
        return JSONResponse(
            {
                "token_endpoint": f"{root}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base(request)}/{directory.tenant_id}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base(request)}/{issuer_tenant}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": f"{base(request)}/oidc/userinfo",
                "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub",
                    "iss",
                    "aud",
                    "exp",
                    "iat",
                    "nonce",
                    "preferred_username",
                    "name",
                    "tid",
                    "ver",
                    "oid",
                ],
                "kerberos_endpoint": f"{root}/kerberos",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
            }
        )

    @app.get("/{tenant}/discovery/v2.0/keys")
    async def keys(tenant: str) -> JSONResponse:
        check_tenant(tenant)
        return JSONResponse(directory.jwks())

    # ------------------------------------------------------------------ authorize
    def _redirect(redirect_uri: str, params: dict[str, str]) -> RedirectResponse:
        sep = "&" if "?" in redirect_uri else "?"
        return RedirectResponse(f"{redirect_uri}{sep}{urlencode(params)}", status_code=302)

    def _error_redirect(redirect_uri: str, error: AadstsError, state: str | None) -> RedirectResponse:
        body = error.body()
        params = {
            "error": body["error"],
            "error_description": body["error_description"],
            "error_uri": body["error_uri"],
        }
        if state is not None:
            params["state"] = state
        return _redirect(redirect_uri, params)

    def _code_redirect(flow: dict[str, Any], upn: str) -> RedirectResponse:
        app_reg = directory.app(flow["client_id"])
        user = directory.user(upn)
        code = directory.issue_code(
            app_reg,
            user,
            flow["redirect_uri"],
            flow["scope"],
            flow.get("code_challenge"),
            flow.get("code_challenge_method"),
            flow.get("nonce"),
        )
        params = {"code": code, "session_state": str(uuid.uuid5(uuid.NAMESPACE_URL, user.oid))}
        if flow.get("state") is not None:
            params["state"] = flow["state"]
        return _redirect(flow["redirect_uri"], params)

    @app.get("/{tenant}/oauth2/v2.0/authorize")
    async def authorize(tenant: str, request: Request) -> Response:
        directory.count("authorize")
        q = dict(request.query_params)
        try:
            check_tenant(tenant)
            for name in ("client_id", "response_type", "redirect_uri", "scope"):
                if not q.get(name):
                    raise errors.missing_parameter(name)
            app_reg, scope_requests = directory.check_authorize_request(q["client_id"], q["redirect_uri"], q["scope"])
        except AadstsError as exc:
            # Like Microsoft: an untrusted redirect URI is never redirected to; show the error.
            return HTMLResponse(pages.error_page("Sign in to your account", exc.body()), status_code=exc.status)
        if q["response_type"] != "code":
            return _error_redirect(
                q["redirect_uri"],
                AadstsError(
                    "unsupported_response_type", 700054, "response_type 'id_token' is not enabled for the application."
                ),
                q.get("state"),
            )
        if q.get("code_challenge_method") not in (None, "S256", "plain"):
            return _error_redirect(
                q["redirect_uri"],
                AadstsError("invalid_request", 50000, "Invalid code_challenge_method."),
                q.get("state"),
            )
        flow = {**q, "created": time.monotonic()}
        hint = (q.get("login_hint") or "").lower()
        prompt = q.get("prompt", "")
        user = directory.users.get(hint)
        if (
            user is not None
            and user.auto_approve
            and prompt not in ("login", "consent", "select_account")
            and not directory.needs_consent(user.upn, app_reg, scope_requests)
        ):
            if user.blocked_by_conditional_access:
                return _error_redirect(q["redirect_uri"], errors.conditional_access_blocked(), q.get("state"))
            return _code_redirect(flow, user.upn)
        if prompt == "none":
            return _error_redirect(
                q["redirect_uri"],
                AadstsError("login_required", 50058, "A silent sign-in request was sent but no user is signed in."),
                q.get("state"),
            )
        flow_id = secrets.token_urlsafe(24)
        pending[flow_id] = flow
        shown = []
        for scope_request in scope_requests:
            _, wanted = directory.requested_permissions(app_reg, scope_request)
            shown += scope_request.qualified(wanted)
        shown += sorted(scope_requests[0].oidc)
        return HTMLResponse(
            pages.sign_in_page(flow_id=flow_id, app_name=app_reg.name, permissions=shown, login_hint=hint)
        )

    @app.post("/{tenant}/oauth2/v2.0/authorize")
    async def authorize_submit(tenant: str, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        flow = pending.get(form.get("flow", ""))
        if flow is None or "device" in flow or time.monotonic() - flow["created"] > FLOW_LIFETIME:
            body = AadstsError("invalid_request", 90014, "The sign-in session expired. Start again.").body()
            return HTMLResponse(pages.error_page("Sign in to your account", body), status_code=400)
        if form.get("decision") != "accept":
            pending.pop(form["flow"], None)
            return _error_redirect(flow["redirect_uri"], errors.user_declined(), flow.get("state"))
        try:
            user = directory.sign_in(form.get("login", ""), form.get("passwd", ""))
        except AadstsError as exc:
            if exc.code == 53003:
                pending.pop(form["flow"], None)
                return _error_redirect(flow["redirect_uri"], exc, flow.get("state"))
            app_reg = directory.app(flow["client_id"])
            return HTMLResponse(
                pages.sign_in_page(
                    flow_id=form["flow"],
                    app_name=app_reg.name,
                    permissions=flow["scope"].split(),
                    login_hint=form.get("login", ""),
                    error="Your account or password is incorrect.",
                ),
                status_code=200,
            )
        pending.pop(form["flow"], None)
        return _code_redirect(flow, user.upn)

    # ------------------------------------------------------------------ token
    @app.post("/{tenant}/oauth2/v2.0/token")
    async def token(tenant: str, request: Request) -> JSONResponse:
        form = {k: str(v) for k, v in (await request.form()).items()}
        grant_type = form.get("grant_type", "")
        directory.count(f"token:{grant_type or 'missing'}")
        fault = directory.take_fault()
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status >= 400:
                if fault.aadsts is not None:
                    error = errors.injected(fault.aadsts, fault.error, fault.status)
                else:
                    error = errors.throttled() if fault.status == 429 else errors.service_unavailable()
                response = JSONResponse(error.body(), status_code=fault.status)
                if fault.retry_after is not None:
                    response.headers["Retry-After"] = str(fault.retry_after)
                return response
        check_tenant(tenant)
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            decoded = base64.b64decode(auth[6:]).decode()
            client_id, _, client_secret = decoded.partition(":")
        if not grant_type:
            raise errors.missing_parameter("grant_type")
        endpoints = frozenset(
            f"{base(request)}/{t}/oauth2/v2.0/token" for t in {tenant, directory.tenant_id, directory.tenant_domain}
        )
        # In a thread: a federated token may need its issuer's keys fetched.
        app_reg = await asyncio.to_thread(
            directory.authenticate_client,
            client_id,
            client_secret,
            form,
            endpoints,
            public_grant=grant_type in (DEVICE_CODE_GRANT, "refresh_token"),
        )
        if grant_type == DEVICE_CODE_GRANT:
            body = device_flows.poll(app_reg, form)
        elif grant_type == "authorization_code":
            body = directory.redeem_code(app_reg, form)
        elif grant_type == "refresh_token":
            body = directory.redeem_refresh_token(app_reg, form)
        elif grant_type == "client_credentials":
            body = directory.client_credentials(app_reg, form)
        else:
            raise errors.unsupported_grant_type(grant_type)
        if form.get("client_info") != "1":
            body.pop("client_info", None)
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    # ------------------------------------------------------------------ device code
    @app.post("/{tenant}/oauth2/v2.0/devicecode")
    async def devicecode(tenant: str, request: Request) -> JSONResponse:
        check_tenant(tenant)
        form = {k: str(v) for k, v in (await request.form()).items()}
        record = device_flows.start(form.get("client_id"), form.get("scope"))
        verification_uri = f"{base(request)}/common/oauth2/deviceauth"
        return JSONResponse(
            {
                "user_code": record.user_code,
                "device_code": record.device_code,
                "verification_uri": verification_uri,
                "expires_in": int(record.expires_at - record.issued_at),
                "interval": record.interval,
                "message": f"To sign in, use a web browser to open the page {verification_uri} and enter the code "
                f"{record.user_code} to authenticate.",
            }
        )

    @app.get("/common/oauth2/deviceauth")
    async def device_page() -> HTMLResponse:
        return HTMLResponse(pages.device_code_page())

    @app.post("/common/oauth2/deviceauth")
    async def device_submit(request: Request) -> HTMLResponse:
        form = {k: str(v) for k, v in (await request.form()).items()}
        if "otc" in form:  # step 1: the code typed by the person
            try:
                record = device_flows.for_user_code(form["otc"])
            except AadstsError as exc:
                return HTMLResponse(pages.device_code_page(error=exc.body()["error_description"]), status_code=400)
            flow_id = secrets.token_urlsafe(24)
            pending[flow_id] = {"device": record, "created": time.monotonic()}
            app_reg = directory.app(record.client_id)
            _, wanted = directory.requested_permissions(app_reg, scopes.parse(record.scope))
            shown = scopes.parse(record.scope).qualified(wanted) + sorted(scopes.parse(record.scope).oidc)
            return HTMLResponse(
                pages.sign_in_page(flow_id=flow_id, app_name=app_reg.name, permissions=shown, login_hint="")
            )
        flow = pending.get(form.get("flow", ""))  # step 2: sign-in and consent
        if flow is None or "device" not in flow or time.monotonic() - flow["created"] > FLOW_LIFETIME:
            return HTMLResponse(
                pages.device_code_page(error="The sign-in session expired. Start again."), status_code=400
            )
        record = flow["device"]
        if form.get("decision") != "accept":
            pending.pop(form["flow"], None)
            device_flows.decide(record, None)
            return HTMLResponse(pages.device_done_page(app_name=directory.app(record.client_id).name, accepted=False))
        try:
            user = directory.sign_in(form.get("login", ""), form.get("passwd", ""))
        except AadstsError as exc:
            app_reg = directory.app(record.client_id)
            return HTMLResponse(
                pages.sign_in_page(
                    flow_id=form["flow"],
                    app_name=app_reg.name,
                    permissions=record.scope.split(),
                    login_hint=form.get("login", ""),
                    error=exc.message if exc.code == 53003 else "Your account or password is incorrect.",
                )
            )
        pending.pop(form["flow"], None)
        device_flows.decide(record, user.upn)
        return HTMLResponse(pages.device_done_page(app_name=directory.app(record.client_id).name, accepted=True))

    @app.get("/_sandbox/admin/device-flows")
    async def device_flow_stats(request: Request) -> JSONResponse:
        require_admin(request)
        return JSONResponse({"flows": device_flows.stats()})

    @app.post("/_sandbox/admin/apps/{client_id}/public-client")
    async def set_public_client(client_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        allowed = bool((await request.json())["allowed"])
        return JSONResponse(
            {"allow_public_client": directory.set_public_client(client_id, allowed).allow_public_client}
        )

    # ------------------------------------------------------------------ Exchange's side
    @app.post("/_sandbox/exchange/introspect")
    async def introspect(request: Request) -> JSONResponse:
        form = await request.form()
        service = request.headers.get("x-dovecot-auth-service")
        return JSONResponse(directory.introspect(str(form.get("token", "")), service))

    @app.post("/_sandbox/exchange/policy")
    async def auth_policy(request: Request) -> JSONResponse:
        """Dovecot's authentication policy check (before the token is looked at): Exchange's own
        refusal text for a mailbox whose protocol is disabled, which Postfix passes on to the client."""
        try:
            payload = await request.json()
        except ValueError:
            payload = {}
        if request.query_params.get("command", "allow") != "allow" or not isinstance(payload, dict):
            return JSONResponse({"status": 0, "msg": ""})
        return JSONResponse(directory.auth_policy(str(payload.get("login", "")), str(payload.get("protocol", ""))))

    # ------------------------------------------------------------------ admin API
    def require_admin(request: Request) -> None:
        if not secrets.compare_digest(request.headers.get("x-sandbox-admin-key", ""), admin_key):
            raise PermissionError

    @app.exception_handler(PermissionError)
    async def _forbidden(_: Request, __: PermissionError) -> JSONResponse:
        return JSONResponse({"detail": "admin key required"}, status_code=403)

    @app.exception_handler(KeyError)
    async def _missing(_: Request, exc: KeyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc.args[0])}, status_code=404)

    @app.get("/_sandbox/admin/state")
    async def state(request: Request) -> JSONResponse:
        require_admin(request)
        return JSONResponse(
            {
                "settings": asdict(directory.settings),
                "counters": dict(directory.counters),
                "grants": {k: asdict(v) for k, v in directory.grants.items()},
                "faults": [asdict(f) for f in directory.faults],
            }
        )

    @app.post("/_sandbox/admin/settings")
    async def settings(request: Request) -> JSONResponse:
        require_admin(request)
        return JSONResponse(asdict(directory.update_settings(**(await request.json()))))

    @app.post("/_sandbox/admin/counters/reset")
    async def reset_counters(request: Request) -> JSONResponse:
        require_admin(request)
        directory.counters.clear()
        return JSONResponse({})

    @app.post("/_sandbox/admin/faults")
    async def add_fault(request: Request) -> JSONResponse:
        require_admin(request)
        directory.faults.append(Fault(**(await request.json())))
        return JSONResponse({"faults": len(directory.faults)})

    @app.delete("/_sandbox/admin/faults")
    async def clear_faults(request: Request) -> JSONResponse:
        require_admin(request)
        directory.faults.clear()
        return JSONResponse({})

    @app.post("/_sandbox/admin/users/{upn}")
    async def update_user(upn: str, request: Request) -> JSONResponse:
        require_admin(request)
        user = directory.update_user(upn, **(await request.json()))
        return JSONResponse({k: v for k, v in asdict(user).items() if k != "password"})

    @app.post("/_sandbox/admin/users/{upn}/revoke-consent")
    async def revoke_consent(upn: str, request: Request) -> JSONResponse:
        require_admin(request)
        payload = await request.json()
        return JSONResponse({"removed": directory.revoke_consent(upn, payload["client_id"], payload.get("resource"))})

    @app.post("/_sandbox/admin/apps/{client_id}/delegated-permissions")
    async def set_delegated_permissions(client_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        payload = await request.json()
        app_reg = directory.set_delegated_permissions(client_id, payload["resource"], list(payload["permissions"]))
        return JSONResponse({"delegated_permissions": app_reg.delegated_permissions})

    @app.post("/_sandbox/admin/apps/{client_id}/app-roles")
    async def set_app_roles(client_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        payload = await request.json()
        app_reg = directory.set_app_roles(client_id, payload["resource"], list(payload["roles"]))
        return JSONResponse({"app_roles": app_reg.app_roles})

    @app.post("/_sandbox/admin/users/{upn}/revoke-sessions")
    async def revoke_sessions(upn: str, request: Request) -> JSONResponse:
        require_admin(request)
        directory.revoke_sessions(upn)
        return JSONResponse({})

    @app.post("/_sandbox/admin/users/{upn}/expire-refresh-tokens")
    async def expire_refresh_tokens(upn: str, request: Request) -> JSONResponse:
        require_admin(request)
        directory.expire_refresh_tokens(upn)
        return JSONResponse({})

    @app.post("/_sandbox/admin/apps/{client_id}/secrets")
    async def add_secret(client_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        payload = await request.json() if await request.body() else {}
        secret = directory.add_secret(client_id, float(payload.get("lifetime_days", 180)))
        return JSONResponse(asdict(secret))

    @app.post("/_sandbox/admin/apps/{client_id}/secrets/expire")
    async def expire_secrets(client_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        directory.expire_secrets(client_id)
        return JSONResponse({})

    @app.delete("/_sandbox/admin/apps/{client_id}/secrets/{secret_id}")
    async def remove_secret(client_id: str, secret_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        directory.remove_secret(client_id, secret_id)
        return JSONResponse({})

    @app.post("/_sandbox/admin/apps/{client_id}/certificates")
    async def add_certificate(client_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        credential = directory.add_certificate(client_id, (await request.json())["certificate"])
        return JSONResponse(asdict(credential))

    @app.post("/_sandbox/admin/apps/{client_id}/federated-credentials")
    async def add_federated_credential(client_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        payload = await request.json()
        credential = FederatedCredential(
            name=payload.get("name", "sandbox"),
            issuer=payload["issuer"],
            subject=payload["subject"],
            audiences=list(payload.get("audiences") or ["api://AzureADTokenExchange"]),
        )
        return JSONResponse(asdict(directory.add_federated_credential(client_id, credential)))

    @app.delete("/_sandbox/admin/apps/{client_id}/{kind}")
    async def clear_app_credentials(client_id: str, kind: str, request: Request) -> JSONResponse:
        """``kind``: ``certificates`` or ``federated-credentials``."""
        require_admin(request)
        directory.clear_credentials(client_id, kind.replace("-", "_"))
        return JSONResponse({})

    @app.post("/_sandbox/admin/consent")
    async def consent(request: Request) -> JSONResponse:
        require_admin(request)
        payload = await request.json()
        app_reg = directory.app(payload["client_id"])
        grant = None
        for scope_request in scopes.parse_per_resource(payload["scope"]):
            resource, wanted = directory.requested_permissions(app_reg, scope_request)
            grant = directory.grant_consent(payload["upn"], app_reg.client_id, resource or scopes.GRAPH, sorted(wanted))
        return JSONResponse(asdict(grant))

    @app.post("/_sandbox/admin/apps/{client_id}/redirect-uris")
    async def add_redirect_uri(client_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        directory.add_redirect_uri(client_id, (await request.json())["redirect_uri"])
        return JSONResponse({})

    @app.post("/_sandbox/admin/mint")
    async def mint(request: Request) -> JSONResponse:
        require_admin(request)
        payload = await request.json()
        token = directory.mint_access_token(
            payload["upn"],
            payload.get("client_id", "sandbox"),
            lifetime=int(payload.get("lifetime", 3600)),
            audience=payload.get("audience", "https://outlook.office.com"),
            scp=payload.get("scp"),
        )
        return JSONResponse({"access_token": token})

    @app.get("/_sandbox/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "tenant": directory.tenant_id})

    return app
