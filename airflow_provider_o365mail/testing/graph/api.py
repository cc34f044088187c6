"""Graph's own host: the ``/v1.0/`` mail endpoints the stand-in implements (path segments case-insensitive).

- ``POST /v1.0/{me | users/{id | upn}}/sendMail``: JSON or base64 MIME; 202
- ``POST .../messages``: create a draft (JSON or MIME); 201
- ``POST .../messages/{id}/attachments``: a file attachment under 3 MB; 201
- ``POST .../messages/{id}/attachments/createUploadSession``: 3 MB to 150 MB; 201 with ``uploadUrl``
- ``POST .../messages/{id}/send``: send a draft; 202

Reading (:mod:`reader`; ``{msg}`` is ``messages/{id}`` or ``mailFolders/{id}/messages/{id}``):

- ``GET .../mailFolders``, ``.../mailFolders/{id}``, ``.../mailFolders/{id}/childFolders``
- ``GET .../messages``, ``.../mailFolders/{id}/messages`` with ``$select $top $skip $filter $orderby
  $search`` and ``Prefer: outlook.body-content-type``
- ``GET .../mailFolders/{id}/messages/delta`` (``Prefer: odata.maxpagesize``)
- ``GET .../{msg}``, ``.../{msg}/$value``, ``.../{msg}/attachments``, ``.../{msg}/attachments/{id}``,
  ``.../{msg}/attachments/{id}/$value``
- ``PATCH .../{msg}`` (isRead, flag), ``POST .../{msg}/move``, ``DELETE .../{msg}``
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
from airflow_provider_o365mail.testing.graph.reader import FULL_READ
from airflow_provider_o365mail.testing.graph.responses import RequestIds, Result, failure
from airflow_provider_o365mail.testing.graph.service import GraphService
from airflow_provider_o365mail.testing.graph.settings import GraphSettings
from airflow_provider_o365mail.testing.graph.tokens import Caller, TokenVerifier

_WHO = r"(?:me|users/(?P<ref>[^/]+))"
_FOLDER = r"mailFolders/(?:[^/]+/childFolders/)*(?P<folder>[^/]+)"
_MSG = rf"{_WHO}/(?:mailFolders/[^/]+/(?:childFolders/[^/]+/)*)?messages/(?P<id>[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(rf"^{_WHO}/{_FOLDER}/messages/delta$", re.I), "messagesDelta"),
    ("POST", re.compile(rf"^{_WHO}/sendMail$", re.I), "sendMail"),
    ("POST", re.compile(rf"^{_WHO}/messages$", re.I), "createMessage"),
    ("POST", re.compile(rf"^{_WHO}/messages/(?P<id>[^/]+)/attachments$", re.I), "addAttachment"),
    (
        "POST",
        re.compile(rf"^{_WHO}/messages/(?P<id>[^/]+)/attachments/createUploadSession$", re.I),
        "createUploadSession",
    ),
    ("POST", re.compile(rf"^{_WHO}/messages/(?P<id>[^/]+)/send$", re.I), "send"),
    ("GET", re.compile(rf"^{_WHO}/{_FOLDER}/messages$", re.I), "listMessages"),
    ("GET", re.compile(rf"^{_WHO}/messages$", re.I), "listMessages"),
    ("GET", re.compile(rf"^{_WHO}/mailFolders$", re.I), "listMailFolders"),
    ("GET", re.compile(rf"^{_WHO}/{_FOLDER}/childFolders$", re.I), "listChildFolders"),
    ("GET", re.compile(rf"^{_WHO}/{_FOLDER}$", re.I), "getMailFolder"),
    ("GET", re.compile(rf"^{_MSG}$", re.I), "getMessage"),
    ("PATCH", re.compile(rf"^{_MSG}$", re.I), "updateMessage"),
    ("DELETE", re.compile(rf"^{_MSG}$", re.I), "deleteMessage"),
    ("GET", re.compile(rf"^{_MSG}/\$value$", re.I), "getMessageValue"),
    ("POST", re.compile(rf"^{_MSG}/move$", re.I), "moveMessage"),
    ("GET", re.compile(rf"^{_MSG}/attachments$", re.I), "listAttachments"),
    ("GET", re.compile(rf"^{_MSG}/attachments/(?P<attachment>[^/]+)$", re.I), "getAttachment"),
    ("GET", re.compile(rf"^{_MSG}/attachments/(?P<attachment>[^/]+)/\$value$", re.I), "getAttachmentValue"),
]
#: Read operations (:class:`MailReader`), and those that answer in the message body format of ``Prefer``.
READ_OPERATIONS = frozenset(
    {
        "messagesDelta",
        "listMessages",
        "listMailFolders",
        "listChildFolders",
        "getMailFolder",
        "getMessage",
        "updateMessage",
        "deleteMessage",
        "getMessageValue",
        "moveMessage",
        "listAttachments",
        "getAttachment",
        "getAttachmentValue",
    }
)


def preferences(header: str | None) -> tuple[str, int | None]:
    """``Prefer``: the body format (``outlook.body-content-type``) and ``odata.maxpagesize``."""
    body_type, page_size = "html", None
    for item in (header or "").split(","):
        name, _, value = item.strip().partition("=")
        value = value.strip().strip('"').lower()
        if name.strip().lower() == "outlook.body-content-type" and value in ("text", "html"):
            body_type = value
        elif name.strip().lower() == "odata.maxpagesize" and value.isdigit() and int(value) > 0:
            page_size = int(value)
    return body_type, page_size


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
            return read(operation, params, caller, mailbox, body)

        def read(operation: str, params: dict[str, str], caller: Caller, mailbox: Any, body: bytes) -> Result:
            reader = service.reader
            query = dict(request.query_params)
            base = str(request.url.replace(query=""))
            body_type, page_size = preferences(request.headers.get("prefer"))
            full = caller.has(*FULL_READ)
            shown = {"body_type": body_type}
            applied = {"Preference-Applied": f'outlook.body-content-type="{body_type}"'} if body_type == "text" else {}
            folder, message_id = params.get("folder"), params.get("id", "")
            if operation == "listMailFolders":
                return Result(200, reader.list_folders(mailbox, None, query, base))
            if operation == "listChildFolders":
                return Result(200, reader.list_folders(mailbox, folder, query, base))
            if operation == "getMailFolder":
                return Result(200, reader.get_folder(mailbox, folder or ""))
            if operation == "listMessages":
                return Result(200, reader.list_messages(mailbox, folder, query, base, full=full, **shown), applied)
            if operation == "messagesDelta":
                root = f"{request.url.scheme}://{request.url.netloc}/v1.0/" + (
                    f"users/{reference}" if reference else "me"
                )
                answer = reader.delta(
                    mailbox,
                    folder or "",
                    query,
                    lambda folder_id: f"{root}/mailFolders/{folder_id}/messages/delta",
                    max_page_size=page_size,
                    full=full,
                    **shown,
                )
                if page_size:
                    applied = {**applied, "Preference-Applied": f"odata.maxpagesize={page_size}"}
                return Result(200, answer, applied)
            if operation == "getMessage":
                return Result(200, reader.get_message(mailbox, message_id, query, full=full, **shown), applied)
            if operation == "getMessageValue":
                mime = reader.message_mime(mailbox, message_id)
                return Result(200, content=mime, media_type=settings.mime_content_type)
            if operation == "listAttachments":
                return Result(200, reader.list_attachments(mailbox, message_id))
            if operation == "getAttachment":
                return Result(200, reader.get_attachment(mailbox, message_id, params["attachment"], query))
            if operation == "getAttachmentValue":
                data, media_type = reader.attachment_value(mailbox, message_id, params["attachment"])
                return Result(200, content=data, media_type=media_type)
            if operation == "updateMessage":
                return Result(200, reader.update_message(mailbox, message_id, body, **shown))
            if operation == "moveMessage":
                return Result(201, reader.move_message(mailbox, message_id, body, **shown))
            reader.delete_message(mailbox, message_id)
            return Result(204)

        return await gateway.run(request, operation, admit, work, body_limit=settings.max_request_bytes)

    async def other_version(request: Request) -> Response:
        version = request.url.path.strip("/").split("/")[0]
        return failure(RequestIds.of(request), errors.GraphError(400, "BadRequest", f"Invalid version: {version}"))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return [Route("/v1.0/{path:path}", endpoint, methods=methods)], Route(
        "/{path:path}", other_version, methods=methods
    )
