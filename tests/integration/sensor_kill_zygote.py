"""A process that plays Airflow's worker for the sensor kill test: one forked child per task try.

It imports the provider once, then reads one JSON command per line from stdin: run one try (or
``phase`` of a try: ``poke``, ``resume`` from the trigger, or ``full``: poke, then the trigger if
nothing was found) of the sensor for ``run_id`` and SIGKILL that try at its ``kill_at``-th boundary (a call into the watermark
store, the check, the post-action, or the XCom write; counted across tries in ``counter``).
The parent test decides task states like Airflow does (``states`` file: success only after a clean
exit with the XCom written) and reads them back through the fake task instance.

Optional keys (the Graph kill test, ``test_graph_sensor_kills.py``): ``transport`` (the sensor's; with
``graph`` every Graph request is a boundary too, before and after, so kills land between the pages
of a delta round and between the post-action's requests), ``page_size`` (Graph messages per page),
``pokes`` (pokes in this process before giving up, ``poke_interval`` apart: poke mode), ``trace``
(a file that gets each boundary's number and name), and ``at_kill`` (``{"sandbox": SandboxInfo
fields, "folder", "message"}``: APPENDed over IMAP just before the SIGKILL: mail arriving at the
moment of the kill).
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_provider_o365mail.core.watermark import VariableWatermarkStore
from airflow_provider_o365mail.hooks.o365mail import O365MailHook
from airflow_provider_o365mail.sensors.imap import O365ImapSensor

#: Log lines share stdout: the parent reads only lines with this prefix.
RESULT = "@@result "


class Boundaries:
    def __init__(
        self, counter: Path, kill_at: int, trace: Path | None = None, at_kill: Callable[[], None] | None = None
    ) -> None:
        self.counter = counter
        self.kill_at = kill_at
        self.trace = trace
        self.at_kill = at_kill

    def cross(self, name: str) -> None:
        n = int(self.counter.read_text() or 0) + 1 if self.counter.exists() else 1
        self.counter.write_text(str(n))
        if self.trace is not None:
            with self.trace.open("a") as trace:
                trace.write(f"{n}\t{name}\n")
        if n == self.kill_at:
            if self.at_kill is not None:
                self.at_kill()
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, owner: type, name: str, label: Callable[..., str] | None = None) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def crossing(*args, **kwargs):
            what = label(*args, **kwargs) if label is not None else name
            self.cross(f"before {what}")
            result = original(*args, **kwargs)
            self.cross(f"after {what}")
            return result

        setattr(owner, name, crossing)


def graph_request_label(_client: Any, method: str, *_args: Any, doing: str = "?", **_kwargs: Any) -> str:
    """``graph GET reading the folder's changes (delta)``: a Graph request as a boundary's name."""
    return f"graph {method} {doing}"


def deliver_at_kill(spec: dict) -> Callable[[], None]:
    """APPEND ``spec["message"]`` to ``spec["folder"]`` over IMAP (mail arriving at the kill)."""

    def deliver() -> None:
        from airflow_provider_o365mail.testing.mailbox import append_messages
        from airflow_provider_o365mail.testing.sandbox import SandboxInfo

        info = SandboxInfo(**{**spec["sandbox"], "state_dir": Path(spec["sandbox"]["state_dir"])})
        append_messages(info, info.user, spec["folder"], [spec["message"].encode()])

    return deliver


class FakeTI:
    def __init__(self, dag_id: str, run_id: str, task_id: str, states: Path) -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index = dag_id, run_id, task_id, -1
        self._states = states

    def get_task_states(self, dag_id, task_ids, run_ids):
        states = json.loads(self._states.read_text()) if self._states.exists() else {}
        return {run: {task_ids[0]: states[run]} for run in run_ids if run in states}


def one_try(command: dict) -> None:
    from airflow import settings

    if settings.engine is not None:  # never share the parent's pooled DB connections
        settings.engine.dispose(close=False)
    boundaries = Boundaries(
        Path(command["counter"]),
        int(command["kill_at"]),
        Path(command["trace"]) if command.get("trace") else None,
        deliver_at_kill(command["at_kill"]) if command.get("at_kill") else None,
    )
    boundaries.wrap(VariableWatermarkStore, "save_state")
    boundaries.wrap(O365MailHook, "check_mail")
    boundaries.wrap(O365MailHook, "apply_post_action")
    transport = command.get("transport")
    if transport == "graph":
        from airflow_provider_o365mail.graph import watch as graph_watch
        from airflow_provider_o365mail.graph.client import GraphClient

        boundaries.wrap(GraphClient, "request", graph_request_label)
        if command.get("page_size"):
            graph_watch.PAGE_SIZE = int(command["page_size"])
    sensor = O365ImapSensor(
        task_id="wait",
        conn_id=command["conn_id"],
        folders=command["folder"],
        new_only=True,
        post_action=command["post_action"],
        move_to=command.get("move_to"),
        max_messages=int(command.get("max_messages") or 100),
        watermark_id=command["watermark_id"],
        **({"transport": transport} if transport else {}),
    )
    ti = FakeTI("kill_dag", command["run_id"], "wait", Path(command["states"]))
    context = {"ti": ti}
    messages = None
    if command["phase"] in ("poke", "full"):  # execute()'s first poke (every try starts with it)
        for poke in range(int(command.get("pokes") or 1)):  # poke mode: the try pokes until it finds mail
            if poke:
                time.sleep(float(command.get("poke_interval") or 0.2))
            found = sensor.poke(context)
            messages = found.xcom_value if found else None
            if messages:
                break
    deferrable = command["mode"] == "deferrable"
    if messages is None and (command["phase"] == "resume" or (command["phase"] == "full" and deferrable)):
        messages = resumed_from_trigger(sensor, context)
    boundaries.cross("before xcom")
    xcom = Path(command["xcom"])
    xcom.write_text(json.dumps(messages))
    boundaries.cross("after xcom")
    os._exit(0 if messages else 3)  # 3: not found yet (the sensor would poke again)


def resumed_from_trigger(sensor: O365ImapSensor, context: dict) -> list | None:
    """The sensor's trigger fires (its real check, in this process), then the worker resumes in
    ``execute_complete``: the deferrable path after a poke that found nothing."""
    import asyncio

    from airflow_provider_o365mail.triggers.imap import O365ImapTrigger

    spec = sensor.watch_spec()
    trigger = O365ImapTrigger(
        conn_id=sensor.conn_id,
        spec=spec.to_dict(),
        watermark_key=sensor.watermark_key(),
        max_idle=30,
        poll_interval=1,
        **({"transport": sensor.transport} if sensor.transport else {}),
    )

    async def fired():
        return await asyncio.wait_for(trigger.run().__anext__(), 60)

    event = asyncio.run(fired())
    return sensor.execute_complete(context, event.payload)


def warm_up() -> None:
    """Import what the tries import, once, before any fork. A child that imports Airflow's models
    lazily from two threads at once (the trigger's check loads a Connection, which configures the
    SQLAlchemy mappers and imports every model, while another thread imports ``Variable``) can
    deadlock on the import lock against SQLAlchemy's configure lock: a try that hangs until
    faulthandler ends it, not the fault this test injects."""
    import airflow.models
    from sqlalchemy.orm import configure_mappers

    airflow.models.import_all_models()
    configure_mappers()
    import airflow.models.connection
    import airflow.models.variable

    import airflow_provider_o365mail.graph.client
    import airflow_provider_o365mail.graph.watch
    import airflow_provider_o365mail.testing.mailbox
    import airflow_provider_o365mail.testing.sandbox
    import airflow_provider_o365mail.triggers.imap  # noqa: F401


def main() -> None:
    warm_up()
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            faulthandler.dump_traceback_later(60, exit=True)  # a hung try shows where, then ends
            try:
                one_try(command)
            except BaseException as err:  # a try that fails: like a task failure
                print(f"try failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        outcome = {"status": status, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}
        print(RESULT + json.dumps(outcome))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
