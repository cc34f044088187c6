"""Outlook's per app and mailbox limits on Graph, and the counters tests assert on (no I/O).

Microsoft Graph throttling limits, Outlook service (learn.microsoft.com/graph/throttling-limits),
applied per app ID and mailbox:

- 10,000 API requests in a 10 minute period;
- 4 concurrent requests;
- 150 megabytes upload (PATCH, POST, PUT) in a 5 minute period.

Over a limit the request is answered 429 ``ApplicationThrottled`` with ``Retry-After``. The
concurrency message is the observed "Application is over its MailboxConcurrency limit."; the
wording for the other two limits is the sandbox's (code against ``code``, never ``message``).
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_provider_o365mail.testing.graph import errors

MiB = 1024 * 1024


@dataclass
class LimitSettings:
    concurrency: int = 4
    requests_per_window: int = 10_000
    request_window: float = 600.0
    upload_bytes_per_window: int = 150 * MiB
    upload_window: float = 300.0
    #: Retry-After (seconds) when refused for concurrency: Microsoft documents no value.
    concurrency_retry_after: int = 1


@dataclass
class Counters:
    """Per mailbox (and per app and mailbox): what tests count instead of trusting a client."""

    requests: int = 0
    throttled: int = 0
    in_flight: int = 0
    peak_concurrency: int = 0
    uploaded_bytes: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)


class Lease:
    """One admitted request's concurrency slot; ``release()`` once it is answered."""

    def __init__(self, limits: Limits, keys: tuple[str, ...]) -> None:
        self._limits = limits
        self._keys = keys
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limits._release(self._keys)


class Limits:
    def __init__(self, settings: LimitSettings | None = None, clock: Callable[[], float] | None = None) -> None:
        import time

        self.settings = settings or LimitSettings()
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._active: defaultdict[str, int] = defaultdict(int)
        self._requests: defaultdict[str, deque[float]] = defaultdict(deque)
        self._uploads: defaultdict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self.counters: defaultdict[str, Counters] = defaultdict(Counters)

    @staticmethod
    def key(app_id: str, mailbox: str) -> str:
        return f"{app_id}|{mailbox.lower()}"

    def admit(self, app_id: str, mailbox: str, operation: str, upload_bytes: int = 0) -> Lease:
        """Count the request; refuse it (429) when the app is over a limit on this mailbox."""
        key, mailbox = self.key(app_id, mailbox), mailbox.lower()
        s = self.settings
        with self._lock:
            now = self._clock()
            for counter in (self.counters[mailbox], self.counters[key]):
                counter.requests += 1
                counter.by_operation[operation] = counter.by_operation.get(operation, 0) + 1
            try:
                if self._active[key] >= s.concurrency:
                    raise errors.throttled("MailboxConcurrency", s.concurrency_retry_after)
                window = self._requests[key]
                while window and window[0] <= now - s.request_window:
                    window.popleft()
                if len(window) >= s.requests_per_window:
                    raise errors.throttled("MailboxRequests", int(window[0] + s.request_window - now) + 1)
                uploads = self._uploads[key]
                while uploads and uploads[0][0] <= now - s.upload_window:
                    uploads.popleft()
                if upload_bytes:
                    used = sum(size for _, size in uploads)
                    if used + upload_bytes > s.upload_bytes_per_window:
                        wait = (uploads[0][0] + s.upload_window - now) if uploads else s.upload_window
                        raise errors.throttled("MailboxUploadBytes", int(wait) + 1)
            except errors.GraphError:
                self.counters[mailbox].throttled += 1
                self.counters[key].throttled += 1
                raise
            window.append(now)
            if upload_bytes:
                uploads.append((now, upload_bytes))
            self._active[key] += 1
            for name in (mailbox, key):
                counter = self.counters[name]
                counter.in_flight += 1
                counter.peak_concurrency = max(counter.peak_concurrency, counter.in_flight)
                counter.uploaded_bytes += upload_bytes
        return Lease(self, (key, mailbox))

    def _release(self, keys: tuple[str, ...]) -> None:
        key, mailbox = keys
        with self._lock:
            self._active[key] -= 1
            self.counters[key].in_flight -= 1
            self.counters[mailbox].in_flight -= 1

    def update(self, **values: Any) -> LimitSettings:
        with self._lock:
            for name, value in values.items():
                if not hasattr(self.settings, name):
                    raise ValueError(f"unknown limit {name!r}")
                converted = type(getattr(self.settings, name))(value)
                if converted <= 0:
                    raise ValueError(f"{name} must be positive")
                setattr(self.settings, name, converted)
            return self.settings

    def reset(self, settings: bool = True) -> None:
        """Zero the windows and counters (in-flight requests keep their slots); ``settings``: defaults too."""
        with self._lock:
            if settings:
                self.settings = LimitSettings()
            self._requests.clear()
            self._uploads.clear()
            for key, counter in list(self.counters.items()):
                self.counters[key] = Counters(in_flight=counter.in_flight)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"limits": asdict(self.settings), "counters": {k: asdict(v) for k, v in self.counters.items()}}
