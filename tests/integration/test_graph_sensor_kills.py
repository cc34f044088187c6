"""SIGKILL the sensor reading over Microsoft Graph at every boundary: nothing lost, nothing repeated.

The Graph twin of ``test_sensor_kills.py`` (same zygote, ``sensor_kill_zygote.py``: one forked
process per poke or try, against the sandbox's Graph stand-in over the same Dovecot and the test's
Airflow metadata DB for the watch's Variable). This test plays the scheduler: a try that exits
cleanly with its XCom written is ``success``; a killed one is ``up_for_retry`` and tried again (3
tries). A *boundary* is each call into the watch's Variable (``save_state``: the reservation, the
confirmation, a no-match check's delta link), the check, the post-action, the XCom write, and each
Graph request (before and after): so the kills land after the check before the reservation is
saved, after the reservation, between the post-action's requests, between the post-action and the
watermark save, and between the pages of a delta round (2 messages a page, at most 2 messages
reported per run, so rounds page and a capped check leaves mail for the next run).

Mail keeps arriving (IMAP APPEND; Graph sees the same mailbox): 3, 2, 1 messages before runs 1-3,
one more before every retry (mail that arrives between a killed try and its retry), and one
APPENDed by the dying try itself just before its SIGKILL (mail that arrives at the moment of the
kill). Runs go on, with no more mail, until a run finds nothing (the sensor would time out; its
first poke confirmed the last reservation).

Modes: ``poke`` (a try pokes until it finds mail, in one process), ``reschedule`` (each poke is a
process of its own; a poke that finds nothing ends as ``up_for_reschedule`` and the next poke is the
same try), ``deferrable`` (the try's first poke runs before the run's mail exists and defers; the
trigger's check and ``execute_complete`` run as the worker would after the trigger fired).

What is counted, by Message-ID, for every kill point: every message APPENDed is in the XCom of a
successful run (0 lost); no message is in the XCom of two successful runs (0 repeated); a killed try
that had written its XCom returned exactly what its successful retry returned (the reservation: a
message goes again only to a retry of the same task instance); after each run the post-action was
applied only to messages of successful runs, and at the end to every message (``seen``: the
``\\Seen`` flag over IMAP; ``move``: each message once in the target folder, none left behind).

CI runs a seeded sample (``O365MAIL_FAULT_SEED`` repeats it; printed): one boundary of each of a few
kinds, different kinds each run. ``O365MAIL_FULL_FAULTS=1`` kills at every boundary of every mode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from test_imap_sensor import raw_message

from airflow_provider_o365mail.testing.mailbox import append_messages, imap_session

ZYGOTE = Path(__file__).with_name("sensor_kill_zygote.py")
TRIES = 3
ARRIVALS = (3, 2, 1)  # messages that arrive before run 1, 2, 3
DRAIN_RUNS = 4  # runs after the last arrival, until one finds nothing
PAGE_SIZE = 2
MAX_MESSAGES = 2
POKES = 2  # poke mode: pokes in one try before it gives up; reschedule mode: pokes (processes) of a try
FULL = os.environ.get("O365MAIL_FULL_FAULTS") == "1"
SEED = int(os.environ.get("O365MAIL_FAULT_SEED") or random.randrange(1 << 30))
#: CI's kill points per mode (one boundary of each of this many kinds, drawn by the seed).
SAMPLED = {"poke": 4, "reschedule": 2, "deferrable": 2}


def kind(name: str) -> str:
    """A boundary's kind: its name without the message it is about."""
    return re.sub(r"'GKill [0-9a-f]+( done)?'", "'<folder>'", re.sub(r" to <[^>]*>", " to <message>", name))


class GraphScheduler:
    def __init__(self, zygote: subprocess.Popen, workdir: Path, conn_id: str, sbx, post_action: str, mode: str):
        self.zygote = zygote
        self.workdir = workdir
        self.conn_id = conn_id
        self.sbx = sbx
        self.post_action = post_action
        self.mode = mode

    def run_try(self, command: dict) -> dict:
        self.zygote.stdin.write(json.dumps(command) + "\n")
        self.zygote.stdin.flush()
        while True:
            line = self.zygote.stdout.readline()
            if not line:
                raise AssertionError("the zygote process ended")
            if line.startswith("@@result "):
                return json.loads(line.removeprefix("@@result "))

    def acted_on(self, folder: str, target: str | None) -> Counter:
        """Message-IDs the post-action shows on: ``\\Seen`` in ``folder``, or present in ``target``."""
        with imap_session(self.sbx, self.sbx.user) as client:
            client.select_folder(target or folder, readonly=True)
            fetched = client.fetch(client.search(["ALL"]), ["ENVELOPE", "FLAGS"]).values()
        return Counter(
            d[b"ENVELOPE"].message_id.decode() for d in fetched if target is not None or b"\\Seen" in d[b"FLAGS"]
        )

    def left_in(self, folder: str) -> set[str]:
        with imap_session(self.sbx, self.sbx.user) as client:
            client.select_folder(folder, readonly=True)
            fetched = client.fetch(client.search(["ALL"]), ["ENVELOPE"]).values()
        return {d[b"ENVELOPE"].message_id.decode() for d in fetched}

    def sequence(self, kill_at: int) -> dict:
        tag = uuid.uuid4().hex[:10]
        folder = f"GKill {tag}"
        target = f"GKill {tag} done" if self.post_action == "move" else None
        work = self.workdir / tag
        work.mkdir()
        states_file, counter, trace = work / "states.json", work / "counter", work / "trace"
        with imap_session(self.sbx, self.sbx.user) as client:
            for name in filter(None, (folder, target)):
                client.create_folder(name)
        sent: list[str] = []
        delivered: dict[str, list[str]] = {}
        killed_xcoms: dict[str, list[list[str]]] = {}
        states: dict[str, str] = {}
        kills = errors = 0
        sandbox = json.loads(json.dumps(dataclasses.asdict(self.sbx), default=str))

        def arrive(ids: list[str]) -> None:
            append_messages(self.sbx, self.sbx.user, folder, [raw_message(f"gkill {tag}", message_id=m) for m in ids])
            sent.extend(ids)

        def save_states() -> None:
            states_file.write_text(json.dumps(states))

        runs = [*ARRIVALS, *[0] * DRAIN_RUNS]
        for run_number, arriving in enumerate(runs, start=1):
            run_id = f"run{run_number}"
            base = {
                "conn_id": self.conn_id,
                "transport": "graph",
                "folder": folder,
                "post_action": self.post_action,
                "move_to": target,
                "max_messages": MAX_MESSAGES,
                "page_size": PAGE_SIZE,
                "watermark_id": f"gkill-{tag}",
                "run_id": run_id,
                "kill_at": kill_at,
                "mode": self.mode,
                "counter": str(counter),
                "states": str(states_file),
                "trace": str(trace),
            }
            states[run_id] = "running"
            save_states()
            phases = ["full"] * TRIES
            if self.mode == "deferrable":
                # try 1 pokes before this run's mail exists and defers (or finds the rest of earlier mail)
                first = self.run_try({**base, "phase": "poke", "xcom": str(work / f"{run_id}.0.xcom")})
                if first["signal"] == 9:
                    kills += 1
                    phases = ["full"] * (TRIES - 1)
                    states[run_id] = "up_for_retry"
                elif first["status"] == 0:
                    phases = []
                    delivered[run_id] = [m["message_id"] for m in json.loads((work / f"{run_id}.0.xcom").read_text())]
                    states[run_id] = "success"
                else:
                    assert first["status"] >> 8 == 3, f"the deferring poke failed: {first}"
                    phases = ["resume", *["full"] * (TRIES - 1)] if arriving else []
                    states[run_id] = "deferred"
            if arriving:
                arrive([f"<{tag}.{run_number}.{i}@partner.test>" for i in range(arriving)])
            for try_number, phase in enumerate(phases, start=1):
                if states[run_id] == "up_for_retry":  # mail arriving between a killed try and its retry
                    arrive([f"<{tag}.{run_number}.retry{try_number}@partner.test>"])
                xcom = work / f"{run_id}.{try_number}.xcom"
                at_kill_id = f"<{tag}.{run_number}.kill{try_number}@partner.test>"
                command = {
                    **base,
                    "phase": phase,
                    "xcom": str(xcom),
                    "pokes": POKES if self.mode == "poke" else 1,
                    "at_kill": {
                        "sandbox": sandbox,
                        "folder": folder,
                        "message": raw_message(f"gkill {tag}", message_id=at_kill_id).decode(),
                    },
                }
                for _poke in range(POKES if self.mode == "reschedule" else 1):
                    outcome = self.run_try(command)
                    if self.mode != "reschedule" or outcome["signal"] or outcome["status"] >> 8 != 3:
                        break
                    states[run_id] = "up_for_reschedule"  # the same try pokes again in a new process
                    save_states()
                if outcome["signal"] == 9:
                    kills += 1
                    sent.append(at_kill_id)  # the dying try APPENDed it
                    states[run_id] = "up_for_retry"
                    if xcom.exists() and json.loads(xcom.read_text()):
                        killed_xcoms.setdefault(run_id, []).append(
                            [m["message_id"] for m in json.loads(xcom.read_text())]
                        )
                elif outcome["status"] == 0 and xcom.exists():
                    states[run_id] = "success"
                    delivered[run_id] = [m["message_id"] for m in json.loads(xcom.read_text())]
                elif outcome["status"] >> 8 == 3:
                    states[run_id] = "skipped"  # found nothing: the sensor times out (soft_fail)
                else:
                    errors += 1
                    states[run_id] = "up_for_retry"
                save_states()
                if states[run_id] in ("success", "skipped"):
                    break
            else:
                if phases:
                    states[run_id] = "failed"
            if states[run_id] == "deferred":  # nothing arrived for it: the trigger would still wait
                states[run_id] = "skipped"
            save_states()
            # the post-action shows only on messages of successful runs
            acted = self.acted_on(folder, target)
            reported = {m for ids in delivered.values() for m in ids}
            assert set(acted) <= reported, f"post-action on unreported mail after {run_id}: {set(acted) - reported}"
            if states[run_id] == "skipped":
                assert not arriving, f"{run_id} found none of its mail: {states}"
                break
        names = dict(line.split("\t", 1) for line in trace.read_text().splitlines()) if trace.exists() else {}
        return {
            "sent": sent,
            "delivered": delivered,
            "killed_xcoms": killed_xcoms,
            "states": states,
            "kills": kills,
            "errors": errors,
            "acted": self.acted_on(folder, target),
            "left": self.left_in(folder) if target else set(),
            "names": {int(n): name.strip() for n, name in names.items()},
        }


@pytest.fixture
def graph_scheduler(graph_conn, o365_sandbox, tmp_path):
    conn_id = graph_conn()  # in os.environ before the zygote starts
    zygote = subprocess.Popen(
        [sys.executable, str(ZYGOTE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ZYGOTE.parent), *sys.path])},
    )
    yield lambda post_action, mode: GraphScheduler(zygote, tmp_path, conn_id, o365_sandbox, post_action, mode)
    zygote.stdin.close()
    zygote.wait(timeout=30)


def planned(names: dict[int, str], sampled: int, seed: int) -> list[int]:
    """Every boundary (full run), else one boundary of each of ``sampled`` kinds, drawn by ``seed``."""
    if FULL:
        return sorted(names)
    by_kind: dict[str, list[int]] = {}
    for n, name in sorted(names.items()):
        by_kind.setdefault(kind(name), []).append(n)
    draw = random.Random(seed)
    kinds = draw.sample(sorted(by_kind), min(sampled, len(by_kind)))
    return sorted(draw.choice(by_kind[k]) for k in kinds)


def check(outcome: dict, kill_at: int | None) -> tuple[int, int]:
    """Assert the guarantee for one sequence; return (messages re-returned to a retry, duplicates)."""
    where = f"kill at {kill_at} ({outcome['names'].get(kill_at, '?')}; seed {SEED}; {outcome['states']})"
    reported = Counter(m for ids in outcome["delivered"].values() for m in set(ids))
    lost = set(outcome["sent"]) - set(reported)
    assert not lost, f"{where}: lost {sorted(lost)}"
    repeated = {m: n for m, n in reported.items() if n > 1}
    assert not repeated, f"{where}: reported by two successful runs {repeated}"
    within = sum(len(ids) - len(set(ids)) for ids in outcome["delivered"].values())
    assert within == 0, f"{where}: a message twice in one XCom"
    again = 0
    for run_id, xcoms in outcome["killed_xcoms"].items():
        for ids in xcoms:  # a try killed after its XCom: its retry returns the same messages
            assert outcome["states"][run_id] == "success" and ids == outcome["delivered"][run_id], where
            again += len(ids)
    assert outcome["errors"] == 0, f"{where}: {outcome['errors']} tries failed without a kill"
    acted = outcome["acted"]
    assert set(acted) == set(outcome["sent"]), f"{where}: post-action missing on {set(outcome['sent']) - set(acted)}"
    assert all(n == 1 for n in acted.values()), f"{where}: moved twice {acted}"
    assert not outcome["left"] & set(outcome["sent"]), f"{where}: not moved {outcome['left']}"
    return again, within


@pytest.mark.timeout(3600)
@pytest.mark.parametrize(("mode", "post_action"), [("poke", "seen"), ("reschedule", "move"), ("deferrable", "seen")])
def test_sigkill_at_any_boundary_over_graph_loses_and_repeats_nothing(
    graph_scheduler, mode, post_action, record_property
):
    sched = graph_scheduler(post_action, mode)
    started = time.monotonic()
    clean = sched.sequence(kill_at=0)
    assert clean["kills"] == 0
    check(clean, None)
    points = planned(clean["names"], SAMPLED[mode], SEED)
    kinds = sorted({kind(clean["names"][n]) for n in points})
    print(
        f"{mode}/{post_action}: {len(clean['names'])} boundaries of {len({kind(n) for n in clean['names'].values()})} "
        f"kinds in a clean sequence ({time.monotonic() - started:.1f} s); killing at {len(points)} "
        f"(O365MAIL_FAULT_SEED={SEED}): {kinds}",
        flush=True,
    )
    again = 0
    for kill_at in points:
        began = time.monotonic()
        outcome = sched.sequence(kill_at=kill_at)
        assert outcome["kills"] == 1, f"kill point {kill_at} of {len(clean['names'])} was not reached"
        returned, _ = check(outcome, kill_at)
        again += returned
        print(
            f"kill at {kill_at} ({outcome['names'][kill_at]}): {time.monotonic() - began:.1f} s, "
            f"{len(outcome['sent'])} sent, 0 lost, 0 repeated, {returned} returned again to the retry",
            flush=True,
        )
    record_property("kill_points", len(points))
    print(
        f"{mode}/{post_action}: {len(points)} kill points of {len(clean['names'])} boundaries, 0 lost, "
        f"0 repeated among successful runs, {again} message(s) returned again to a retry of the same task instance"
    )
