"""Every answer of the stand-in carries ``request-id`` and ``client-request-id``; errors have Graph's shape."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from airflow_provider_o365mail.testing.graph import errors
from airflow_provider_o365mail.testing.graph.errors import GraphError


@dataclass(frozen=True)
class RequestIds:
    request_id: str
    client_request_id: str

    @classmethod
    def of(cls, request: Request) -> RequestIds:
        """A new ``request-id``; the client's ``client-request-id`` echoed (one is made up when absent)."""
        return cls(str(uuid.uuid4()), request.headers.get("client-request-id") or str(uuid.uuid4()))

    def headers(self) -> dict[str, str]:
        return {"request-id": self.request_id, "client-request-id": self.client_request_id}


@dataclass
class Result:
    """A successful answer: status, optional JSON body, extra headers."""

    status: int
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Raw bytes instead of JSON (a MIME ``/$value``, an attachment's ``/$value``), sent in chunks.
    content: bytes | None = None
    media_type: str = "application/octet-stream"


STREAM_CHUNK = 64 * 1024


def success(ids: RequestIds, result: Result) -> Response:
    headers = {**ids.headers(), **result.headers}
    if result.content is not None:
        data = result.content

        async def chunks():
            for start in range(0, len(data), STREAM_CHUNK):
                yield data[start : start + STREAM_CHUNK]

        headers["Content-Length"] = str(len(data))
        return StreamingResponse(chunks(), status_code=result.status, headers=headers, media_type=result.media_type)
    if result.json is None:
        return Response(status_code=result.status, headers={**headers, "Content-Length": "0"})
    return JSONResponse(result.json, status_code=result.status, headers=headers)


def failure(ids: RequestIds, error: GraphError) -> JSONResponse:
    return JSONResponse(
        errors.body(error, ids.request_id, ids.client_request_id),
        status_code=error.status,
        headers={**ids.headers(), **error.headers},
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` (also without Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.request_too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.request_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def drop_connection(request: Request) -> bool:
    """Close the client's connection without an answer (the transport uvicorn serves it on)."""
    transport = request.scope.get("o365sandbox.transport")
    if transport is None:
        return False
    transport.abort()
    return True


class TransportCapture:
    """Outermost ASGI layer: remembers each request's transport so a fault can cut the connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            scope["o365sandbox.transport"] = getattr(getattr(send, "__self__", None), "transport", None)
        await self.app(scope, receive, send)
