"""An upload session's URL carries its own credential (``authtoken``): it is masked in logs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_the_upload_urls_authtoken_is_masked_by_both_maskers():
    code = """
        import json
        from airflow.sdk._shared.secrets_masker import redact as sdk_redact
        from airflow._shared.secrets_masker import redact as core_redact
        from airflow_provider_o365mail.hooks.o365mail import _redact_url
        token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.upload-session-credential-7f3a9c"
        url = "https://outlook.office.com/api/v2.0/Users('a')/Messages('b')/AttachmentSessions('c')?authtoken=" + token
        _redact_url(url)
        line = "PUT " + url + " 200"
        print(json.dumps([token in sdk_redact(line), token in core_redact(line)]))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [False, False]
