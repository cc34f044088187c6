"""HTTPS requests to Microsoft Graph with the connection's token, inside Outlook's limits.

- Each request holds a slot of the mailbox's budget (Outlook allows 4 concurrent requests per app
  and mailbox) for its duration, and each attempt first takes its turn from the mailbox's
  :class:`RequestPacer` (Outlook allows 10,000 requests per 10 minutes per app and mailbox): one
  pacer per mailbox and process, shared by sending, sensors and the triggers' delta polls.
- 429 (``ApplicationThrottled``), 500, 502, 503 and 504 are waited out (``Retry-After`` honoured, up
  to :attr:`Backoff.max_retry_after`) and retried a bounded number of times; so are connections that
  could not be opened.
- A 401 is retried once with a refreshed token; then it is permanent.
- A request that changes something not safe to repeat (a send; an upload chunk) and got no answer,
  or a 504, raises :class:`NoAnswer`: the caller decides (Sent Items lookup, resume the upload).
- Permanent refusals raise the error :mod:`.errors` maps (cause and fix).

Tokens never appear in logs or errors: requests' exceptions are reduced to their class name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

import requests
import urllib3

from airflow_provider_o365mail.exceptions import MailServerUnavailable
from airflow_provider_o365mail.graph.errors import GraphReply, parse_reply, permanent_error
from airflow_provider_o365mail.retry import Backoff

if TYPE_CHECKING:
    from airflow_provider_o365mail.core.credentials import ExpiringToken

log = logging.getLogger(__name__)

#: Temporary failures of one request: 6 attempts, waits of about 2, 4, 8, 16, 32 s, or Graph's
#: ``Retry-After`` up to 5 minutes (Outlook's throttling windows are 5 and 10 minutes).
GRAPH_RETRY = Backoff(first=2.0, maximum=60.0, attempts=6, jitter=(0.75, 1.0), max_retry_after=300.0)
#: ``token(force_refresh)``: a Graph access token (refreshed when the last one was refused).
GraphTokenSource = Callable[[bool], "ExpiringToken"]


#: Outlook's request window (10 minutes) and the default number of requests this process lets out in
#: one (well under Outlook's 10,000: other processes and apps may use the mailbox too).
PACING_WINDOW_SECONDS = 600.0
DEFAULT_REQUESTS_PER_WINDOW = 8000


class RequestPacer:
    """At most ``limit`` requests start in any ``window`` seconds (a sliding window; thread-safe).

    :meth:`wait_turn` blocks until a request may start and counts it. A caller never waits longer
    than ``window`` for one turn.

    :param clock: monotonic seconds; ``sleep``: blocking waits (tests pass a fake clock for both).
    """

    def __init__(
        self,
        limit: int,
        window: float = PACING_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError(f"a pacer needs limit >= 1 and window > 0, not {limit} and {window}")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._started: deque[float] = deque()
        self.granted = 0
        self.waited = 0.0

    def _try(self) -> float:
        """Take a turn now (0.0) or say how long until one frees up."""
        with self._lock:
            now = self._clock()
            while self._started and self._started[0] <= now - self.window:
                self._started.popleft()
            if len(self._started) < self.limit:
                self._started.append(now)
                self.granted += 1
                return 0.0
            return max(self._started[0] + self.window - now, 0.001)

    def wait_turn(self) -> float:
        """Block until a request may start; the seconds waited."""
        waited = 0.0
        while (delay := self._try()) > 0:
            if waited == 0.0:
                log.info(
                    "Pacing Microsoft Graph requests: %d started in the last %.0f s; waiting %.1f s.",
                    self.limit,
                    self.window,
                    delay,
                )
            self._sleep(delay)
            waited += delay
        with self._lock:
            self.waited += waited
        return waited

    def in_window(self) -> int:
        """Requests started in the current window."""
        with self._lock:
            now = self._clock()
            return sum(1 for t in self._started if t > now - self.window)


_PACERS: dict[Hashable, RequestPacer] = {}
_PACERS_LOCK = threading.Lock()


def request_pacer(key: Hashable, limit: int, window: float = PACING_WINDOW_SECONDS) -> RequestPacer:
    """The process-wide pacer of ``key`` (connection and mailbox); a changed ``limit`` starts a new one."""
    with _PACERS_LOCK:
        pacer = _PACERS.get(key)
        if pacer is None or pacer.limit != limit or pacer.window != window:
            pacer = _PACERS[key] = RequestPacer(limit, window)
        return pacer


def _after_fork_in_child() -> None:
    # A forked task process starts with its own count (its parent's requests are the parent's).
    global _PACERS_LOCK
    _PACERS_LOCK = threading.Lock()
    _PACERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class NoAnswer(Exception):
    """A request that must not be repeated blindly went out and its outcome is unknown."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GraphClient:
    """Requests to ``{base_url}/...`` (``https://graph.microsoft.com/v1.0``) for one connection and mailbox.

    :param token: Graph access tokens (``token(force_refresh)``).
    :param session: a ``requests.Session`` that verifies TLS (and knows the proxy); closed by :meth:`close`.
    :param slot: held around each request (the mailbox's concurrency budget); ``None``: no budget.
    :param pacer: each attempt waits its turn (inside the slot); ``None``: no pacing.
    :param conn_id: named in errors' fixes; ``mailbox``: named in errors.
    """

    def __init__(
        self,
        base_url: str,
        token: GraphTokenSource,
        *,
        session: requests.Session,
        timeout: float,
        conn_id: str,
        mailbox: str,
        retry: Backoff = GRAPH_RETRY,
        sleep: Callable[[float], None] = time.sleep,
        slot: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        pacer: RequestPacer | None = None,
    ) -> None:
        if retry.attempts is None:
            raise ValueError("the Graph retry policy needs a bounded number of attempts")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._session = session
        self.timeout = timeout
        self.conn_id = conn_id
        self.mailbox = mailbox
        self.retry = retry
        self._sleep = sleep
        self._slot = slot
        self._pacer = pacer
        self.requests_made = 0

    def __repr__(self) -> str:
        return f"GraphClient({self.base_url!r}, mailbox={self.mailbox!r})"

    def close(self) -> None:
        self._session.close()

    def url(self, path: str) -> str:
        return path if path.startswith("https://") else f"{self.base_url}/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        doing: str,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        authorized: bool = True,
        repeatable: bool = True,
        stream: bool = False,
    ) -> requests.Response:
        """One Graph request with the retries above; the 2xx response.

        :param doing: what the request does, for errors ("sending message <id>").
        :param authorized: send the bearer token (not on an upload session's pre-authenticated URL).
        :param repeatable: False for a request whose repetition could change something twice (a send,
            an upload chunk): an unanswered attempt or a 504 raises :class:`NoAnswer` instead of a retry.
        :param stream: the 2xx response's body is read by the caller (``iter_content``), not here.
        """
        url = self.url(path)
        force_refresh = False
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            reason, retry_after = self._attempt(
                method, url, doing, json, data, headers, params, authorized, repeatable, force_refresh, stream
            )
            if isinstance(reason, requests.Response):
                return reason
            if isinstance(reason, GraphReply):
                if reason.status == 401 and authorized and not refreshed:
                    refreshed = force_refresh = True  # once more with a new token, at once
                    log.info("Graph refused the access token while %s; retrying once with a refreshed token.", doing)
                    attempt -= 1
                    continue
                if not reason.temporary:
                    raise permanent_error(reason, doing=doing, mailbox=self.mailbox, conn_id=self.conn_id)
                if reason.status == 504 and not repeatable:
                    raise NoAnswer(f"Graph answered {reason.describe()}")
                text = reason.describe()
            else:
                text = reason
            force_refresh = False
            if self.retry.gives_up_after(attempt):
                raise MailServerUnavailable(
                    f"Microsoft Graph failed {attempt} times while {doing}; last: {text}. Graph throttles each app "
                    "per mailbox (4 concurrent requests, 10,000 requests per 10 minutes, 150 MB of uploads per 5 "
                    "minutes): run fewer sending tasks per mailbox at once (an Airflow pool) or retry later."
                )
            delay = self.retry.delay(attempt, retry_after)
            log.warning(
                "Microsoft Graph: %s while %s (attempt %d of %d); retrying in %.1f s.",
                text,
                doing,
                attempt,
                self.retry.attempts,
                delay,
            )
            self._sleep(delay)

    def _attempt(
        self,
        method: str,
        url: str,
        doing: str,
        json: Any,
        data: bytes | None,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        authorized: bool,
        repeatable: bool,
        force_refresh: bool,
        stream: bool = False,
    ) -> tuple[requests.Response | GraphReply | str, float | None]:
        """One try: the response, the refusal, or why nothing came back (and a ``Retry-After``)."""
        sent_headers = dict(headers or {})
        if authorized:
            # The token first, outside the slot: a refresh can take a while.
            sent_headers["Authorization"] = f"Bearer {self._token(force_refresh).token}"
        with self._slot() if self._slot is not None else contextlib.nullcontext():
            if self._pacer is not None:
                self._pacer.wait_turn()  # Outlook counts every request, retries too
            self.requests_made += 1
            try:
                response = self._session.request(
                    method,
                    url,
                    json=json,
                    data=data,
                    headers=sent_headers,
                    params=params,
                    timeout=self.timeout,
                    allow_redirects=False,
                    stream=stream,
                )
            except requests.exceptions.SSLError as err:
                raise MailServerUnavailable(
                    f"TLS to Microsoft Graph failed while {doing} ({type(err).__name__}); nothing was sent. If the "
                    "certificate is not trusted, set the connection's ca_bundle."
                ) from None
            except requests.exceptions.ConnectTimeout:
                return "could not connect (timeout)", None
            except requests.exceptions.ProxyError as err:
                return f"proxy error ({type(err).__name__})", None
            except (requests.ConnectionError, requests.Timeout) as err:
                if not repeatable and not _never_sent(err):
                    raise NoAnswer(f"no answer from Graph ({type(err).__name__})") from None
                return f"no answer ({type(err).__name__})", None
        if 200 <= response.status_code < 300:
            return response, None
        reply = parse_reply(response.status_code, response.headers, response.content)
        return reply, reply.retry_after


def _never_sent(err: BaseException) -> bool:
    """The connection itself could not be opened (refused, unreachable): the request never went out."""
    reason = getattr(err.args[0], "reason", None) if err.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError)


__all__ = [
    "DEFAULT_REQUESTS_PER_WINDOW",
    "GRAPH_RETRY",
    "PACING_WINDOW_SECONDS",
    "GraphClient",
    "GraphTokenSource",
    "NoAnswer",
    "RequestPacer",
    "request_pacer",
]
