"""A named lock shared by every process of this host (``flock``), for read-modify-write of Variables.

The Variable API has no compare-and-swap. Tasks of one mailbox that update one shared Variable
(the recipient budget, the send-ledger index) serialise through this lock: exact on one host,
which is where Airflow's LocalExecutor and one Celery worker run; across hosts it is not a lock
(the recipient budget adds the cross-host lease of ``auth/lease.py`` in the hook).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class LockTimeout(TimeoutError):
    """Another process held the lock longer than the caller wanted to wait."""


class LockDirError(OSError):
    """The lock file cannot be created (``O365MAIL_LOCK_DIR`` missing or not writable)."""

    def __init__(self, lock_dir: Path, err: OSError, configured: bool) -> None:
        super().__init__(err.errno, err.strerror)
        self.lock_dir, self.configured = lock_dir, configured
        self.reason = err.strerror or type(err).__name__


def lock_dir() -> tuple[Path, bool]:
    """Where lock files live, and whether ``O365MAIL_LOCK_DIR`` chose it."""
    configured = os.environ.get("O365MAIL_LOCK_DIR")
    return Path(configured or tempfile.gettempdir()), bool(configured)


@contextlib.contextmanager
def host_lock(name: str, timeout: float = 60.0) -> Iterator[None]:
    """Hold the exclusive lock ``name`` (any string) until the block ends.

    Raises :class:`LockDirError` or :class:`LockTimeout` before the block runs, never from it.
    """
    directory, configured = lock_dir()
    digest = hashlib.sha256(name.encode()).hexdigest()[:24]
    try:
        fd = os.open(directory / f"airflow-o365mail-{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise LockDirError(directory, err, configured) from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"waited {timeout:.0f} s for the lock {name!r}") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the flock
