"""Give back a process's connection slots before it stops, while it can still reach Airflow.

A task process that used IMAP or SMTP may still hold slots of a mailbox's budget shared across hosts
(:mod:`..hooks.shared_budget`): its pooled IMAP session stays logged in for a few seconds after a
check. The slots are Variables, and a task reaches Variables only through its supervisor's socket,
which the task runner closes at the end of ``main()`` (Airflow 3.1 to 3.3), before ``atexit``
handlers run. So the ``atexit`` release cannot work in a task, and a slot left behind stays taken
until its lease expires (a minute or more), which every other host waits for. Airflow calls
``before_stopping(component)`` from the task runner's ``finalize`` (after success, failure and
deferral alike) while the socket is still open, and when a scheduler or triggerer job ends.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)


@hookimpl
def before_stopping(component: Any) -> None:
    from airflow_provider_o365mail.hooks.shared_budget import held_count, release_all

    if not held_count():
        return
    try:
        given_back = release_all()
    except Exception as err:  # never fail a task on its way out; the slots expire with their lease
        log.warning("Could not give back this process's connection slots: %s", type(err).__name__)
        return
    log.debug("Gave back %d connection slot(s) before stopping.", given_back)
