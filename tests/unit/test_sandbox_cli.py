"""``python -m airflow_provider_o365mail.testing down --env-file X`` stops the sandbox X describes."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_o365mail.testing import __main__ as cli


def test_down_with_an_env_file_targets_the_sandbox_it_names(tmp_path, monkeypatch):
    env_file = tmp_path / ".sandbox.env"
    env_file.write_text(f"O365_SANDBOX_STATE_DIR='{tmp_path / 'elsewhere'}'\nO365_SANDBOX_USER=x\n")
    stopped: list[Path] = []

    class Recorder:
        def __init__(self, state_dir: Path) -> None:
            self.state_dir = state_dir

        def down(self, purge: bool = False) -> None:
            stopped.append(self.state_dir)

    monkeypatch.setattr(cli, "Sandbox", Recorder)
    assert cli.main(["down", "--env-file", str(env_file)]) == 0
    assert stopped == [tmp_path / "elsewhere"], "not the default sandbox (another run may be using it)"
    assert not env_file.exists()
    cli.main(["down", "--env-file", str(tmp_path / "missing.env"), "--state-dir", str(tmp_path / "given")])
    assert stopped[-1] == tmp_path / "given"
    cli.main(["down"])
    assert stopped[-1] == cli.DEFAULT_STATE_DIR
