"""Packaging: the pytest11 plugin costs users' unrelated test runs nothing (no heavy import until a
fixture is used); package metadata a platform team checks before adopting the provider."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("airflow", "msal", "requests", "fastapi", "uvicorn", "httpx", "cryptography", "jwt", "sqlalchemy")
PLUGIN = "airflow_provider_o365mail.testing.pytest_plugin"


def run_pytest(tmp_path: Path, test_source: str) -> dict:
    """Run pytest on one unrelated test file with only the plugin loaded; the file's test writes
    which heavy packages were imported, and whether pytest knows the plugin's option and fixtures."""
    report = tmp_path / "report.json"
    (tmp_path / "test_unrelated.py").write_text(
        textwrap.dedent(test_source)
        + textwrap.dedent(
            f"""
            import json, sys

            def test_unrelated(pytestconfig):
                heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
                fixtures = pytestconfig.pluginmanager.get_plugin({PLUGIN!r})
                with open({str(report)!r}, "w") as fh:
                    json.dump({{
                        "heavy": heavy,
                        "option": pytestconfig.getoption("--o365-sandbox-state-dir", default="missing"),
                        "plugin": fixtures is not None and hasattr(fixtures, "o365_sandbox"),
                    }}, fh)
                assert 1 + 1 == 2
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # Only this plugin (no other installed one that might import airflow), as an entry point would load it.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", PLUGIN, "-p", "no:cacheprovider", "-q", "test_unrelated.py"],
        cwd=tmp_path,  # outside the repository: its conftest.py (Airflow DB) is not collected
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(report.read_text())


def test_plugin_imports_nothing_heavy_until_a_fixture_is_used(tmp_path):
    report = run_pytest(tmp_path, "")
    assert report["plugin"] and report["option"] is None, "the plugin was loaded and registered its option"
    assert report["heavy"] == [], f"an unrelated test run imported {report['heavy']}"


def test_the_check_sees_a_heavy_import(tmp_path):
    # The same probe notices the sandbox's dependencies once the sandbox module is imported.
    report = run_pytest(tmp_path, "import airflow_provider_o365mail.testing.sandbox\n")
    assert "requests" in report["heavy"]


@pytest.mark.parametrize("name", ["Sandbox", "SandboxInfo", "read_env_file"])
def test_package_exports_stay_importable(name):
    import airflow_provider_o365mail.testing as testing
    from airflow_provider_o365mail.testing import sandbox

    assert getattr(testing, name) is getattr(sandbox, name)
    with pytest.raises(AttributeError):
        testing.no_such_name


# ---------------------------------------------------------------- metadata (the built artefacts: scripts/check_dist.py)
ROOT = Path(__file__).parents[2]
REPO_URL = "https://github.com/o365mail/airflow-provider-o365mail"
DOCS_SITE = "https://o365mail.github.io/airflow-provider-o365mail/"  # mkdocs.yml's site_url


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_readme_links_work_on_pypi():
    """PyPI renders the README without the repository: relative links would be dead there."""
    import re

    targets = re.findall(r"\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    assert targets, "the README links its docs"
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert relative == []
    for target in targets:
        if target.startswith(f"{REPO_URL}/blob/main/") or target.startswith(f"{REPO_URL}/tree/main/"):
            path = target.split("/main/", 1)[1].split("#")[0]
            assert (ROOT / path).exists(), f"README links {path}, which is not in the repository"


def test_one_repository_url_everywhere():
    from airflow_provider_o365mail import hints
    from airflow_provider_o365mail.get_provider_info import get_provider_info

    urls = pyproject()["project"]["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Source", "Changelog", "Issues"}
    docs = urls.pop("Documentation")
    assert all(url.startswith(REPO_URL) for url in urls.values())
    assert docs == DOCS_SITE
    assert DOCS_SITE.rstrip("/") == hints.DOCS_URL
    # Airflow >= 3.3 takes the documentation URL from Project-URL, older versions from provider info.
    assert get_provider_info()["documentation-url"] == docs


def test_license_and_classifiers():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    classifiers = project["classifiers"]
    assert {"Framework :: Apache Airflow", "Framework :: Apache Airflow :: Provider"} <= set(classifiers)
    python = {c.rsplit(":: ", 1)[1] for c in classifiers if c.startswith("Programming Language :: Python :: 3.")}
    assert python == {"3.11", "3.12", "3.13"}
    assert not [c for c in classifiers if c.startswith("License ::")], "PEP 639: the license expression only"
    assert (ROOT / "airflow_provider_o365mail" / "py.typed").exists()


def test_changelog_has_the_released_version_and_unreleased():
    from airflow_provider_o365mail import __version__

    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert f"## [{__version__}]" in changelog


# ---------------------------------------------------------------- constraints files (scripts/update-constraints.sh)
CONSTRAINTS = ROOT / "constraints"
SUPPORTED_MINORS = ["3.1", "3.2", "3.3"]  # docs/compatibility.md; the newest is the dev venv's
#: Extras each file was made with: the newest minor's is the dev venv's, the others the compatibility job's.
CONSTRAINT_EXTRAS = {"3.1": ["test"], "3.2": ["test"], "3.3": ["dev", "test", "bench", "docs"]}
RAW_URL = "https://raw.githubusercontent.com/o365mail/airflow-provider-o365mail/main/"


def constraint_pins(minor: str) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (CONSTRAINTS / f"airflow-{minor}.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and " " not in line and "@" not in line, f"airflow-{minor}.txt: not a name==version pin: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def test_one_constraints_file_per_supported_airflow():
    assert sorted(p.name for p in CONSTRAINTS.iterdir()) == [f"airflow-{m}.txt" for m in SUPPORTED_MINORS]


@pytest.mark.parametrize("minor", SUPPORTED_MINORS)
def test_constraints_pin_their_airflow_and_every_dependency(minor):
    """A fresh install under the file takes no version of the index's choosing for anything the
    provider or its tools need, and every pin satisfies pyproject.toml's requirement."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = constraint_pins(minor)
    assert Version(pins["apache-airflow"]).release[:2] == tuple(int(n) for n in minor.split("."))
    assert "airflow-provider-o365mail" not in pins, "the provider itself must stay installable at any version"
    header = (CONSTRAINTS / f"airflow-{minor}.txt").read_text().splitlines()[:8]
    assert header[0].endswith(f"(apache-airflow=={pins['apache-airflow']}), Python 3.11."), header[0]
    assert any(f"bash scripts/update-constraints.sh {minor}" in line for line in header), "says how to remake it"
    project = pyproject()["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for e in CONSTRAINT_EXTRAS[minor] for r in project["optional-dependencies"][e]]
    for req in requirements:
        name = canonicalize_name(req.name)
        if name == "airflow-provider-o365mail":  # [dev]'s reference to the other extras
            continue
        assert name in pins, f"airflow-{minor}.txt does not pin {req.name}: a fresh install takes the newest"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"


def test_installers_use_the_constraints_files():
    """bootstrap.sh (the dev venv, main-job.sh, test.sh) and package-check.sh install under the newest
    minor's file, compat-test.sh under the oldest's; each stops when its file is missing."""
    import re

    newest, oldest = SUPPORTED_MINORS[-1], SUPPORTED_MINORS[0]
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert re.search(rf"^CONSTRAINTS=constraints/airflow-{newest}\.txt$", bootstrap, re.M)
    assert re.search(r'pip install -q -e "\.\[dev\]" -c "\$CONSTRAINTS"$', bootstrap, re.M)
    assert 'if [ ! -f "$CONSTRAINTS" ]; then' in bootstrap
    package_check = (ROOT / "scripts" / "package-check.sh").read_text()
    assert f"CONSTRAINTS=$REPO/constraints/airflow-{newest}.txt" in package_check
    assert '-c "$CONSTRAINTS"' in package_check
    compat = (ROOT / "scripts" / "compat-test.sh").read_text()
    assert f"else minor={oldest}; fi" in compat
    assert '-c "$CONSTRAINTS")' in compat
    assert 'if [ ! -f "$CONSTRAINTS" ]; then' in compat
    assert re.search(rf"^DEV_MINOR={newest}$", (ROOT / "scripts" / "update-constraints.sh").read_text(), re.M)


@pytest.mark.parametrize("doc", ["README.md", "docs/index.md"])
def test_install_lines_name_a_constraints_file(doc):
    """Users' install line pins what was tested: `pip install airflow-provider-o365mail -c <file>`,
    the file's URL in the repository (raw, so pip reads the text), which exists."""
    import re

    lines = [line for line in (ROOT / doc).read_text().splitlines() if "pip install airflow-provider-o365mail" in line]
    assert lines, f"{doc} has an install line"
    for line in lines:
        match = re.fullmatch(rf"pip install airflow-provider-o365mail -c {re.escape(RAW_URL)}(\S+)", line.strip())
        assert match, f"{doc}: {line!r} installs without a constraints file"
        assert (ROOT / match[1]).is_file(), f"{doc} names {match[1]}, which is not in the repository"


def test_compatibility_doc_names_the_pinned_airflow_of_each_file():
    doc = (ROOT / "docs" / "compatibility.md").read_text()
    for minor in SUPPORTED_MINORS:
        row = f"| {minor} | [`constraints/airflow-{minor}.txt`]({RAW_URL}constraints/airflow-{minor}.txt) | "
        row += f"`apache-airflow=={constraint_pins(minor)['apache-airflow']}`"
        assert row in doc, f"docs/compatibility.md's constraints table is stale for {minor}"


def test_every_data_file_of_the_package_is_declared_package_data():
    """A template that no package-data glob matches is missing from the wheel, and the page it
    renders fails only once installed (the editable checkout has it). package-check.sh builds the
    wheel; this catches the gap without a build."""
    package_data = pyproject()["tool"]["setuptools"]["package-data"]
    declared = {
        path
        for package, globs in package_data.items()
        for pattern in globs
        for path in (ROOT / package.replace(".", "/")).glob(pattern)
    }
    data_files = {
        path
        for path in (ROOT / "airflow_provider_o365mail").rglob("*")
        if path.is_file() and path.suffix not in {".py", ".pyc"} and "__pycache__" not in path.parts
    }
    assert data_files - declared == set()
    assert {p.name for p in declared if p.parent.name == "templates" and p.parent.parent.name == "plugins"} >= {
        "index.html",
        "result.html",
    }
