"""Graph's own host: the ``/v1.0/`` mail endpoints the stand-in implements (path segments case-insensitive).

- ``POST /v1.0/{me | users/{id | upn}}/sendMail``: JSON or base64 MIME; 202
- ``POST .../messages``: create a draft (JSON or MIME); 201
- ``POST .../messages/{id}/attachments``: a file attachment under 3 MB; 201
- ``POST .../messages/{id}/attachments/createUploadSession``: 3 MB to 150 MB; 201 with ``uploadUrl``
- ``POST .../messages/{id}/send``: send a draft; 202
- ``GET .../mailFolders/{well-known name}/messages[?$filter=internetMessageId eq '<id>'&$select=...]``
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from airflow_provider_o365mail.testing.graph import errors
from airflow_provider_o365mail.testing.graph.gateway import Gateway, content_length
from airflow_provider_o365mail.testing.graph.responses import RequestIds, Result, failure
from airflow_provider_o365mail.testing.graph.service import GraphService
from airflow_provider_o365mail.testing.graph.settings import GraphSettings
from airflow_provider_o365mail.testing.graph.tokens import Caller, TokenVerifier

_WHO = r"(?:me|users/(?P<ref>[^/]+))"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(rf"^{_WHO}/sendMail$", re.I), "sendMail"),
    ("POST", re.compile(rf"^{_WHO}/messages$", re.I), "createMessage"),
    ("POST", re.compile(rf"^{_WHO}/messages/(?P<id>[^/]+)/attachments$", re.I), "addAttachment"),
    (
        "POST",
        re.compile(rf"^{_WHO}/messages/(?P<id>[^/]+)/attachments/createUploadSession$", re.I),
        "createUploadSession",
    ),
    ("POST", re.compile(rf"^{_WHO}/messages/(?P<id>[^/]+)/send$", re.I), "send"),
    ("GET", re.compile(rf"^{_WHO}/mailFolders/(?P<folder>[^/]+)/messages$", re.I), "listMessages"),
]


def match(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The operation and path parameters of ``path`` (below ``/v1.0/``); 405 / 400 like Graph otherwise."""
    known_path = False
    for route_method, pattern, operation in ROUTES:
        found = pattern.match(path)
        if found:
            known_path = True
            if route_method == method:
                return operation, {k: v for k, v in found.groupdict().items() if v is not None}
    if known_path:
        raise errors.GraphError(
            405, "Request_BadRequest", f"The HTTP method '{method}' is not allowed for this resource."
        )
    raise errors.unknown_segment(path.split("/")[-1] or path)


def routes(
    verifier: TokenVerifier,
    service: GraphService,
    gateway: Gateway,
    settings: GraphSettings,
    upload_root: Callable[[], str],
) -> list[Route]:
    async def endpoint(request: Request) -> Response:
        path = request.path_params["path"]
        try:
            operation, params = match(request.method, path)
        except errors.GraphError as error:
            return failure(RequestIds.of(request), error)
        reference = params.get("ref")
        state: dict[str, Any] = {}

        async def admit() -> tuple[str, str, int]:
            caller = verifier.verify(request.headers.get("authorization"))
            mailbox = await asyncio.to_thread(service.mailbox, caller, reference)
            service.authorize(caller, mailbox, operation)
            state.update(caller=caller, mailbox=mailbox)
            return caller.app_id, mailbox.address, content_length(request)

        content_type = request.headers.get("content-type", "application/json").lower()

        def work(body: bytes) -> Result:
            caller: Caller = state["caller"]
            mailbox = state["mailbox"]
            if operation == "sendMail":
                service.send_mail(caller, mailbox, content_type, body)
                return Result(202)
            if operation == "createMessage":
                return Result(201, service.create_draft(caller, mailbox, content_type, body))
            if operation == "addAttachment":
                return Result(201, service.add_attachment(mailbox, params["id"], body))
            if operation == "createUploadSession":
                return Result(201, service.create_upload_session(caller, mailbox, params["id"], body, upload_root()))
            if operation == "send":
                service.send_draft(caller, mailbox, params["id"])
                return Result(202)
            query = dict(request.query_params)
            base = str(request.url.replace(query=""))
            return Result(200, service.list_messages(mailbox, params["folder"], query, base))

        return await gateway.run(request, operation, admit, work, body_limit=settings.max_request_bytes)

    async def other_version(request: Request) -> Response:
        version = request.url.path.strip("/").split("/")[0]
        return failure(RequestIds.of(request), errors.GraphError(400, "BadRequest", f"Invalid version: {version}"))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return [Route("/v1.0/{path:path}", endpoint, methods=methods)], Route(
        "/{path:path}", other_version, methods=methods
    )
