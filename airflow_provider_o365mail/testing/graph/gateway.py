"""The path every Graph and upload request takes: authenticate, authorize, throttle, inject, work, answer.

Order: the token (401), the mailbox (400 for ``/me`` with an app-only token, 404), the permission
(403), the request size (413), Outlook's per app and mailbox limits (429), then an injected fault
if one matches, then the operation (in a thread: it talks to Dovecot), then the answer. Every
answer carries ``request-id`` and ``client-request-id``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from airflow_provider_o365mail.testing.graph import errors
from airflow_provider_o365mail.testing.graph.errors import GraphError
from airflow_provider_o365mail.testing.graph.faults import Fault, FaultQueue
from airflow_provider_o365mail.testing.graph.limits import Limits
from airflow_provider_o365mail.testing.graph.responses import (
    RequestIds,
    Result,
    drop_connection,
    failure,
    read_body,
    success,
)

log = logging.getLogger(__name__)
#: A held request goes on by itself after this long (a test that forgot ``release()`` cannot hang it).
HOLD_TIMEOUT = 120.0
UPLOAD_METHODS = ("POST", "PUT", "PATCH")


class Gateway:
    def __init__(self, limits: Limits, faults: FaultQueue) -> None:
        self.limits = limits
        self.faults = faults
        self.held = 0
        self._release = asyncio.Event()

    def release(self) -> int:
        """Let every held request go on; returns how many were waiting."""
        waiting = self.held
        self._release.set()
        self._release = asyncio.Event()
        return waiting

    async def _apply_before(self, fault: Fault | None) -> None:
        if fault is None:
            return
        if fault.kind == "error":
            raise errors.injected(fault.status, fault.code, fault.message, fault.retry_after)
        if fault.kind == "hold":
            self.held += 1
            try:
                await asyncio.wait_for(self._release.wait(), HOLD_TIMEOUT)
            except TimeoutError:
                pass
            finally:
                self.held -= 1

    async def run(
        self,
        request: Request,
        operation: str,
        admit: Callable[[], Awaitable[tuple[str, str, int]]],
        work: Callable[[bytes], Result],
        *,
        body_limit: int,
    ) -> Response:
        """``admit`` checks who may do what and returns ``(app_id, mailbox, upload_bytes)``; ``work`` runs in a thread."""
        ids = RequestIds.of(request)
        lease = None
        try:
            app_id, mailbox, upload_bytes = await admit()
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > body_limit:
                raise errors.request_too_large(body_limit)
            lease = self.limits.admit(
                app_id, mailbox, operation, upload_bytes if request.method in UPLOAD_METHODS else 0
            )
            body = await read_body(request, body_limit)
            fault = self.faults.take(operation, mailbox)
            await self._apply_before(fault)
            result = await asyncio.to_thread(work, body)
            if fault is not None and fault.kind == "after_delivery":
                raise errors.injected(fault.status, fault.code, fault.message, fault.retry_after)
            if fault is not None and fault.kind == "drop_after_delivery" and drop_connection(request):
                return Response(status_code=500)  # never reaches the client: the connection is gone
            return success(ids, result)
        except GraphError as error:
            return failure(ids, error)
        except Exception:
            log.exception("Graph stand-in: %s failed (request-id %s)", operation, ids.request_id)
            return failure(
                ids, GraphError(500, "generalException", "The sandbox's Graph stand-in failed; see graph.log.")
            )
        finally:
            if lease is not None:
                lease.release()


def content_length(request: Request) -> int:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else 0
