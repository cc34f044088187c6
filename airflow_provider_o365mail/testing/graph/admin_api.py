"""The Graph stand-in's admin API under ``/_sandbox/admin/graph/`` (header ``X-Sandbox-Admin-Key``).

Settings and limits, mailbox rights, application access policies, injected faults, held requests,
counters, the log of what was delivered and the delta tokens (expire or reset them). :class:`~airflow_provider_o365mail.testing.admin.SandboxAdmin`
has a method for each route.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from airflow_provider_o365mail.testing.graph.faults import Fault, FaultQueue
from airflow_provider_o365mail.testing.graph.gateway import Gateway
from airflow_provider_o365mail.testing.graph.limits import Limits, LimitSettings
from airflow_provider_o365mail.testing.graph.service import GraphService
from airflow_provider_o365mail.testing.graph.settings import GraphSettings

PREFIX = "/_sandbox/admin/graph"


def routes(
    admin_key: str,
    service: GraphService,
    settings: GraphSettings,
    limits: Limits,
    faults: FaultQueue,
    gateway: Gateway,
) -> list[Route]:
    limit_names = set(LimitSettings.__dataclass_fields__)

    def guarded(handler: Callable[[Request, dict[str, Any]], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> JSONResponse:
            if not secrets.compare_digest(request.headers.get("x-sandbox-admin-key", ""), admin_key):
                return JSONResponse({"detail": "admin key required"}, status_code=403)
            payload = await request.json() if await request.body() else {}
            try:
                return JSONResponse(handler(request, payload))
            except KeyError as exc:
                return JSONResponse({"detail": str(exc.args[0])}, status_code=404)
            except (ValueError, TypeError) as exc:
                return JSONResponse({"detail": str(exc)}, status_code=400)

        return endpoint

    def state(_: Request, __: dict) -> dict[str, Any]:
        return {
            "settings": settings.as_dict(),
            **limits.state(),
            **service.tenant.state(),
            "faults": faults.pending(),
            "fired": list(faults.fired),
            "held": gateway.held,
            "upload_sessions": service.uploads.count(),
            "delta_tokens": service.reader.deltas.count() if service.reader else {},
        }

    def update_settings(_: Request, values: dict) -> dict[str, Any]:
        graph_values = {k: v for k, v in values.items() if k not in limit_names}
        limit_values = {k: v for k, v in values.items() if k in limit_names}
        settings.update(**graph_values)
        limits.update(**limit_values)
        return {"settings": settings.as_dict(), "limits": asdict(limits.settings)}

    def update_mailbox(request: Request, values: dict) -> dict[str, Any]:
        return asdict(service.tenant.update_mailbox(request.path_params["address"], **values))

    def access_policy(request: Request, values: dict) -> dict[str, Any]:
        service.tenant.set_access_policy(request.path_params["app_id"], values.get("mailboxes"))
        return service.tenant.state()["access_policies"]

    def add_fault(_: Request, values: dict) -> dict[str, Any]:
        return {"faults": faults.add(Fault(**values))}

    def clear_faults(_: Request, __: dict) -> dict[str, Any]:
        faults.clear()
        return {}

    def release(_: Request, __: dict) -> dict[str, Any]:
        return {"released": gateway.release()}

    def deliveries(_: Request, __: dict) -> dict[str, Any]:
        return {"deliveries": list(service.deliveries)}

    def expire_delta(_: Request, values: dict) -> dict[str, Any]:
        if service.reader is None:
            raise ValueError("this stand-in serves no reading")
        how = values.get("how", "syncStateNotFound")
        return {"expired": service.reader.deltas.expire(values.get("mailbox"), how)}

    def reset_counters(_: Request, __: dict) -> dict[str, Any]:
        limits.reset(settings=False)
        faults.fired.clear()
        service.deliveries.clear()
        return {}

    def reset(_: Request, __: dict) -> dict[str, Any]:
        faults.clear()
        gateway.release()
        limits.reset(settings=True)
        settings.update(**GraphSettings().as_dict())
        service.tenant.reset()
        service.deliveries.clear()
        return {}

    return [
        Route(f"{PREFIX}/state", guarded(state), methods=["GET"]),
        Route(f"{PREFIX}/settings", guarded(update_settings), methods=["POST"]),
        Route(f"{PREFIX}/mailboxes/{{address}}", guarded(update_mailbox), methods=["POST"]),
        Route(f"{PREFIX}/access-policies/{{app_id}}", guarded(access_policy), methods=["POST"]),
        Route(f"{PREFIX}/faults", guarded(add_fault), methods=["POST"]),
        Route(f"{PREFIX}/faults", guarded(clear_faults), methods=["DELETE"]),
        Route(f"{PREFIX}/release", guarded(release), methods=["POST"]),
        Route(f"{PREFIX}/deliveries", guarded(deliveries), methods=["GET"]),
        Route(f"{PREFIX}/counters/reset", guarded(reset_counters), methods=["POST"]),
        Route(f"{PREFIX}/delta/expire", guarded(expire_delta), methods=["POST"]),
        Route(f"{PREFIX}/reset", guarded(reset), methods=["POST"]),
        Route("/_sandbox/health", lambda _: JSONResponse({"status": "ok"}), methods=["GET"]),
    ]
