"""The upload host (Outlook's, in the sandbox another loopback address): pre-authenticated ``uploadUrl``s.

``PUT`` appends a chunk (200 with ``nextExpectedRanges``, the last one 201 with ``Location``),
``DELETE`` cancels (204). No ``Authorization`` header: the ``authtoken`` in the URL is the
credential, and a bearer token is refused (401), as on OneDrive's upload URLs. Only these two
methods are documented for Outlook attachment sessions; others get 405.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from airflow_provider_o365mail.testing.graph import errors, views
from airflow_provider_o365mail.testing.graph.gateway import Gateway, content_length
from airflow_provider_o365mail.testing.graph.responses import RequestIds, Result, failure
from airflow_provider_o365mail.testing.graph.service import GraphService
from airflow_provider_o365mail.testing.graph.settings import GraphSettings
from airflow_provider_o365mail.testing.graph.uploads import UploadBook, UploadSession

SESSION_PATH = re.compile(
    r"^/api/v2\.0/Users\('(?P<user>[^']+)'\)/Messages\('(?P<message>[^']+)'\)/AttachmentSessions\('(?P<session>[^']+)'\)$",
    re.I,
)


def bearer_refused() -> errors.GraphError:
    return errors.GraphError(
        401,
        "InvalidAudienceForResource",
        "The audience claim value is invalid for current resource. The upload URL is pre-authenticated: send no "
        "Authorization header.",
    )


def routes(
    service: GraphService,
    uploads: UploadBook,
    gateway: Gateway,
    settings: GraphSettings,
    now: Callable[[], float],
    outlook_root: Callable[[], str],
) -> list[Route]:
    async def endpoint(request: Request) -> Response:
        ids = RequestIds.of(request)
        found = SESSION_PATH.match(request.url.path)
        if found is None:
            return failure(ids, errors.GraphError(404, "ErrorInvalidUrl", "The URL is not an upload session URL."))
        if request.method not in ("PUT", "DELETE"):
            return failure(
                ids,
                errors.GraphError(
                    405, "ErrorInvalidRequest", f"{request.method} is not supported on an upload session."
                ),
            )
        if settings.upload_reject_authorization and "authorization" in request.headers:
            return failure(ids, bearer_refused())
        try:
            session = uploads.get(found.group("session"), request.query_params.get("authtoken"), now())
            if session.draft_id != found.group("message"):
                raise errors.item_not_found()
        except errors.GraphError as error:
            return failure(ids, error)

        async def admit() -> tuple[str, str, int]:
            return session.app_id, session.mailbox, content_length(request)

        if request.method == "DELETE":

            def cancel(_: bytes) -> Result:
                uploads.close(session)
                return Result(204)

            return await gateway.run(request, "cancelUpload", admit, cancel, body_limit=settings.upload_max_chunk)

        def put(body: bytes) -> Result:
            return _chunk(service, session, request.headers.get("content-range"), body, outlook_root())

        return await gateway.run(request, "uploadChunk", admit, put, body_limit=settings.upload_max_chunk)

    return [Route("/{path:path}", endpoint, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])]


def _chunk(service: GraphService, session: UploadSession, content_range: str | None, body: bytes, root: str) -> Result:
    stored = service.upload_chunk(session, content_range, body)
    if stored is None:
        return Result(200, views.upload_progress(session, root))
    location = f"{root}/Users('{session.user_key}')/Messages('{session.draft_id}')/Attachments('{stored.id}')"
    return Result(201, None, {"Location": location})
