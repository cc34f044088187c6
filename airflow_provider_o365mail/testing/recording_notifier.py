"""A notifier for tests of the credential watch: each call appends one JSON line to a file."""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.sdk import BaseNotifier


class RecordingNotifier(BaseNotifier):
    """``RecordingNotifier(path=..., text="{{ message }}")``: ``text`` is templated with the notifier's context."""

    template_fields = ("text",)

    def __init__(self, *, path: str, text: str = "{{ message }}", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.text = text

    def notify(self, context: Any) -> None:
        line = json.dumps(
            {
                "pid": os.getpid(),
                "text": self.text,
                "subject": context.get("subject"),
                "conn_id": context.get("conn_id"),
                "credential": context.get("o365mail_credential"),
            }
        )
        with open(self.path, "a") as out:
            out.write(line + "\n")
