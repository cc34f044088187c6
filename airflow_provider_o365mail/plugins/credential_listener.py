"""Run the credential watch in the scheduler and the triggerer, with nothing to schedule.

Airflow calls the lifecycle listener ``on_starting(component)`` when a job starts (scheduler,
triggerer, DAG processor: ``airflow/jobs/job.py``, Airflow 3.1 to 3.3) and in every task process
(``TaskRunnerMarker``); ``before_stopping(component)`` when the job ends. For a job this starts one
daemon thread that waits a little (the job's runner sets ``job_type`` right after ``on_starting``,
and the scheduler starts its children first), keeps running only in a ``SchedulerJob`` or a
``TriggererJob``, and then checks every ``o365mail`` connection Airflow can see once per
``[o365mail] credential_watch_interval_seconds`` (:mod:`..hooks.credential_watch`: a lease and a
state Variable per connection make it once per period across every scheduler and triggerer).
``[o365mail] credential_watch = False`` turns it off.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)

#: The jobs the watch runs in: every deployment has a scheduler; triggerers are usually there too.
WATCHING_JOBS = frozenset({"SchedulerJob", "TriggererJob"})
#: The first check waits between half of this and this (``[o365mail] credential_watch_first_check_seconds``).
FIRST_CHECK_DELAY = 120.0

_threads: dict[int, WatchThread] = {}
_threads_lock = threading.Lock()


class WatchThread(threading.Thread):
    """The watch of one job: first check after a short random delay, then once per interval."""

    def __init__(self, component: Any, interval: float, first_check: float = FIRST_CHECK_DELAY) -> None:
        super().__init__(name="o365mail-credential-watch", daemon=True)
        self.component = component
        self.interval = interval
        self.first_check = first_check
        self.stopping = threading.Event()

    def job_type(self) -> str | None:
        return getattr(self.component, "job_type", None)

    def run(self) -> None:
        first = min(self.first_check, self.interval)
        delay = first * (0.5 + random.random() / 2)  # noqa: S311 - spreads the hosts' first checks, not cryptography
        if self.stopping.wait(delay):
            return
        if self.job_type() not in WATCHING_JOBS:
            return
        log.info(
            "Credential watch started in this %s (pid %d): every %.0f s; [o365mail] credential_watch = False turns "
            "it off.",
            self.job_type(),
            os.getpid(),
            self.interval,
        )
        while not self.stopping.is_set():
            try:
                outcomes = check_all_connections(who=f"{self.job_type()} pid {os.getpid()}")
                log.info(
                    "Credential watch pass: %s",
                    "; ".join(f"{o.conn_id}: {o.summary()}" for o in outcomes) or "no o365mail connection",
                )
            except Exception as err:  # never let the watch take a job down
                log.warning("Credential watch: the check failed: %s: %s", type(err).__name__, err)
            if self.stopping.wait(self.interval):
                return


def check_all_connections(who: str = "") -> list[Any]:
    """One pass of the watch over every ``o365mail`` connection Airflow can see."""
    from airflow.utils.session import create_session

    from airflow_provider_o365mail.connection import settings_from_connection
    from airflow_provider_o365mail.exceptions import O365MailError
    from airflow_provider_o365mail.hooks.credential_watch import CredentialWatch, WatchConfig
    from airflow_provider_o365mail.plugins.connection_states import discover

    config = WatchConfig.configured()
    with create_session() as session:
        found = discover(session)
    connections = []
    for connection, _source in found:
        try:
            connections.append(settings_from_connection(connection))
        except O365MailError:
            continue  # misconfigured: the page and doctor say why
    return CredentialWatch(config, who=who).run(connections)


def _is_job(component: Any) -> bool:
    """A scheduler/triggerer/DAG-processor job (not the task runner's marker)."""
    return type(component).__name__ == "Job" and hasattr(component, "job_type")


@hookimpl
def on_starting(component: Any) -> None:
    if not _is_job(component):
        return
    try:
        from airflow_provider_o365mail.hooks.credential_watch import WatchConfig

        config = WatchConfig.configured()
    except Exception as err:
        log.warning("Credential watch not started: %s", err)
        return
    if not config.enabled:
        return
    from airflow_provider_o365mail.version_compat import conf

    first = conf.getfloat("o365mail", "credential_watch_first_check_seconds", fallback=FIRST_CHECK_DELAY)
    thread = WatchThread(component, config.interval, first)
    with _threads_lock:
        _threads[id(component)] = thread
    thread.start()


@hookimpl
def before_stopping(component: Any) -> None:
    with _threads_lock:
        thread = _threads.pop(id(component), None)
    if thread is not None:
        thread.stopping.set()
