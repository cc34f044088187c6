"""SIGKILL the sensor at every boundary of its check/reserve/XCom/confirm path: nothing is lost.

The zygote (``sensor_kill_zygote.py``) forks one process per task try, against the sandbox's
Dovecot and the test's Airflow metadata DB (the watermark Variable). This test plays the
scheduler: a try that exits cleanly with its XCom written is ``success``; a killed one is retried
(``up_for_retry``) up to 3 tries, then ``failed``. Mail arrives between runs. For each kill point
the whole sequence runs from a fresh folder, and what counts is the XCom of successful runs and
the flags in the mailbox, by Message-ID.

CI runs every second boundary of the poke path with ``post_action="seen"`` (18 of 36), every sixth
one with ``"flag"`` (6) and every twelfth one of the deferrable path (the trigger's check, then
``execute_complete``; about 3): about 27 kill points, a different sample each day
(``O365MAIL_FAULT_SEED`` repeats one). ``O365MAIL_FULL_FAULTS=1`` runs all of them.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_imap_sensor import raw_message

from airflow_provider_o365mail.testing.mailbox import append_messages, imap_session

ZYGOTE = Path(__file__).with_name("sensor_kill_zygote.py")
TRIES = 3
ARRIVALS = (3, 2, 1, 1)  # messages that arrive before run 1, 2, 3, 4


class Scheduler:
    def __init__(self, zygote: subprocess.Popen, workdir: Path, conn_id: str, post_action: str, mode: str) -> None:
        self.mode = mode
        self.zygote = zygote
        self.workdir = workdir
        self.conn_id = conn_id
        self.post_action = post_action

    def run_try(self, command: dict) -> dict:
        self.zygote.stdin.write(json.dumps(command) + "\n")
        self.zygote.stdin.flush()
        return self.outcome()

    def outcome(self) -> dict:
        while True:
            line = self.zygote.stdout.readline()
            if not line:
                raise AssertionError("the zygote process ended")
            if line.startswith("@@result "):
                return json.loads(line.removeprefix("@@result "))

    def sequence(self, sbx, kill_at: int) -> dict:
        tag = uuid.uuid4().hex[:10]
        folder = f"Kill {tag}"
        work = self.workdir / tag
        work.mkdir()
        states: dict[str, str] = {}
        states_file, counter = work / "states.json", work / "counter"
        with imap_session(sbx, sbx.user) as client:
            client.create_folder(folder)
        sent: list[str] = []
        delivered: dict[str, list[str]] = {}
        kills = 0
        for run_number, arriving in enumerate(ARRIVALS, start=1):
            ids = [f"<{tag}.{run_number}.{i}@partner.test>" for i in range(arriving)]
            run_id = f"run{run_number}"
            xcom = work / f"{run_id}.xcom"
            command = {
                "conn_id": self.conn_id,
                "folder": folder,
                "post_action": self.post_action,
                "watermark_id": f"kill-{tag}",
                "run_id": run_id,
                "kill_at": kill_at,
                "mode": self.mode,
                "counter": str(counter),
                "states": str(states_file),
                "xcom": str(xcom),
            }
            phases = ["full"] * TRIES
            if self.mode == "deferrable":
                # try 1 pokes before the mail exists and defers; the mail arrives; the trigger fires
                # and the worker resumes (still try 1); a retry starts over with a poke.
                first = self.run_try({**command, "phase": "poke"})
                if first["signal"] == 9:
                    kills += 1
                    phases = ["full"] * (TRIES - 1)
                else:
                    assert first["status"] >> 8 == 3, "nothing to find before the mail arrived"
                    phases = ["resume", *["full"] * (TRIES - 1)]
            append_messages(sbx, sbx.user, folder, [raw_message(f"kill {tag}", message_id=m) for m in ids])
            sent.extend(ids)
            states[run_id] = "failed"
            for phase in phases:
                outcome = self.run_try({**command, "phase": phase})
                if outcome["signal"] == 9:
                    kills += 1
                    states[run_id] = "up_for_retry"
                elif outcome["status"] == 0 and xcom.exists():
                    states[run_id] = "success"
                    delivered[run_id] = [m["message_id"] for m in json.loads(xcom.read_text())]
                else:
                    states[run_id] = "up_for_retry"
                states_file.write_text(json.dumps(states))
                if states[run_id] == "success":
                    break
            else:
                states[run_id] = "failed"
                states_file.write_text(json.dumps(states))
        with imap_session(sbx, sbx.user) as client:
            client.select_folder(folder, readonly=True)
            flags = {
                data[b"ENVELOPE"].message_id.decode(): set(data[b"FLAGS"])
                for data in client.fetch(client.search(["ALL"]), ["ENVELOPE", "FLAGS"]).values()
            }
        boundaries = int(counter.read_text()) if counter.exists() else 0
        return {
            "sent": sent,
            "delivered": delivered,
            "states": states,
            "kills": kills,
            "flags": flags,
            "boundaries": boundaries,
        }


@pytest.fixture
def scheduler(o365mail_conn, tmp_path):
    zygote = subprocess.Popen(
        [sys.executable, str(ZYGOTE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ZYGOTE.parent), *sys.path])},
    )
    yield lambda post_action, mode: Scheduler(zygote, tmp_path, o365mail_conn, post_action, mode)
    zygote.stdin.close()
    zygote.wait(timeout=30)


#: Which of each ``every`` boundaries CI kills at: a different one each day (so that successive CI runs
#: cover all of them), or ``O365MAIL_FAULT_SEED`` to repeat a run. Printed with every kill point.
FAULT_SEED = int(os.environ.get("O365MAIL_FAULT_SEED") or datetime.date.today().toordinal())


def kill_points(total: int, every: int) -> list[int]:
    if os.environ.get("O365MAIL_FULL_FAULTS") == "1":
        every = 1
    return list(range(1 + FAULT_SEED % every, total + 1, every))


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    ("mode", "post_action", "every"), [("poke", "seen", 2), ("poke", "flag", 6), ("deferrable", "seen", 12)]
)
def test_sigkill_at_any_boundary_loses_no_message(scheduler, o365_sandbox, mode, post_action, every, record_property):
    sched = scheduler(post_action, mode)
    clean = sched.sequence(o365_sandbox, kill_at=0)
    assert clean["kills"] == 0 and all(s == "success" for s in clean["states"].values())
    assert sorted(m for ids in clean["delivered"].values() for m in ids) == sorted(clean["sent"]), "no kill: once each"
    points = kill_points(clean["boundaries"], every)
    duplicates = 0
    for kill_at in points:
        started = time.monotonic()
        outcome = sched.sequence(o365_sandbox, kill_at=kill_at)
        print(
            f"kill point {kill_at} (O365MAIL_FAULT_SEED={FAULT_SEED}): {time.monotonic() - started:.1f} s, "
            f"states {outcome['states']}",
            flush=True,
        )
        assert outcome["kills"] == 1, f"kill point {kill_at} of {clean['boundaries']} was not reached"
        delivered = [m for run, ids in outcome["delivered"].items() for m in ids]
        lost = set(outcome["sent"]) - set(delivered)
        assert not lost, (
            f"SIGKILL at boundary {kill_at}: lost {sorted(lost)} ({outcome['states']}; O365MAIL_FAULT_SEED={FAULT_SEED})"
        )
        duplicates += len(delivered) - len(set(delivered))
        # every message of a run that a later run confirmed carries the post-action
        flag = {"seen": b"\\Seen", "flag": b"\\Flagged"}[post_action]
        confirmed = {m for run, ids in outcome["delivered"].items() if run != "run4" for m in ids}
        assert all(flag in outcome["flags"][m] for m in confirmed), f"post-action missing after kill at {kill_at}"
    record_property("kill_points", len(points))
    record_property("duplicates", duplicates)
    print(
        f"{post_action}: {len(points)} kill points of {clean['boundaries']} boundaries, 0 lost, {duplicates} duplicates"
    )
