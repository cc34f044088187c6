"""The anchor of bench/graph_send.py: Apache Airflow's own Microsoft Graph email backend, in its own venv.

Runs under the anchor's interpreter (a venv with apache-airflow and
apache-airflow-providers-microsoft-azure, never this provider), started by ``bench/graph_send.py``.
It sends through ``airflow.providers.microsoft.azure.hooks.msgraph.send_email``, the function
``[email] email_backend`` names for Graph (app-only client credentials, ``MSGraphMailHook``), with the
connection ``AIRFLOW_CONN_MSGRAPH_BENCH`` that the parent exports (host, authority and CA of the
sandbox's stand-ins).

Two modes, answers on stdout as lines starting with ``@@ `` followed by JSON (Airflow's own log
lines may be interleaved):

- ``serve``: reads one JSON command per line from stdin, ``{"n", "subject", "to", "from"}``, sends
  ``n`` messages one call each (as Airflow calls an email backend: once per message) and answers
  ``{"elapsed", "errors"}``; the elapsed time covers only the sends.
- ``one FILE TO FROM SUBJECT``: sends one message with ``FILE`` attached in this fresh process and
  answers ``{"elapsed", "error", "rss_before", "rss_peak", "process_peak"}`` in bytes: RSS just before
  the send, peak RSS during it (``VmHWM`` reset just before), peak RSS over the process's life (``VmHWM``).

bench/graph_send.py's own child imports :func:`reset_peak_rss` and :func:`memory_figures` from here, so
that both sides measure alike (this module imports only the standard library at module level).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CONN_ID = "msgraph_bench"


def answer(payload: dict) -> None:
    print("@@ " + json.dumps(payload), flush=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


_startup_peak = 0


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (``VmHWM``; Linux >= 4.0) to its current RSS, which it returns (bytes).

    The peak until then (imports, tokens, composing) is kept for :func:`memory_figures`.
    (``getrusage``'s ``ru_maxrss`` is no use here: after ``fork`` + ``exec`` it keeps the parent's peak.)
    """
    global _startup_peak
    _startup_peak = _status_kib("VmHWM") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def memory_figures() -> dict[str, int]:
    """``rss_peak``: the peak RSS since :func:`reset_peak_rss`; ``process_peak``: over the process's life."""
    peak = _status_kib("VmHWM") * 1024
    return {"rss_peak": peak, "process_peak": max(peak, _startup_peak)}


def main() -> None:
    from airflow.providers.microsoft.azure.hooks.msgraph import send_email

    def send(subject: str, to: str, sender: str, files: list[str] | None = None) -> None:
        send_email(
            to=to,
            subject=subject,
            html_content=f"<p>{subject}: 1,234 rows loaded.</p>",
            files=files,
            conn_id=CONN_ID,
            from_email=sender,
        )

    mode = sys.argv[1]
    if mode == "serve":
        answer({"ready": True})
        for line in sys.stdin:
            command = json.loads(line)
            errors: list[str] = []
            started = time.perf_counter()
            for i in range(command["n"]):
                try:
                    send(f"{command['subject']} #{i}", command["to"], command["from"])
                except Exception as err:  # reported, counted against delivery by the parent
                    errors.append(f"{type(err).__name__}: {err}"[:500])
            answer({"elapsed": time.perf_counter() - started, "errors": errors})
    elif mode == "one":
        path, to, sender, subject = sys.argv[2:6]
        rss_before = reset_peak_rss()  # everything imported; the send measured from here
        started = time.perf_counter()
        error = None
        try:
            send(subject, to, sender, files=[path])
        except Exception as err:
            error = f"{type(err).__name__}: {err}"[:500]
        answer({"elapsed": time.perf_counter() - started, "error": error, "rss_before": rss_before, **memory_figures()})
    else:
        raise SystemExit(f"unknown mode {mode!r}: serve or one")


if __name__ == "__main__":
    main()
