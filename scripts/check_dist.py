"""Check the built wheel and sdist: what they contain and what their metadata says.

Usage: python scripts/check_dist.py DIST_DIR SOURCE_DIR

Run by scripts/package-check.sh after ``python -m build``. SOURCE_DIR is the tree that was built;
every package file in it must be in the wheel, every project file the sdist promises must be in
the sdist. Exits non-zero with one line per problem.
"""

from __future__ import annotations

import configparser
import email.parser
import sys
import tarfile
import zipfile
from pathlib import Path

PACKAGE = "airflow_provider_o365mail"
REPO_URL = "https://github.com/o365mail/airflow-provider-o365mail"
DOCS_SITE = "https://o365mail.github.io/airflow-provider-o365mail/"  # mkdocs.yml's site_url
ENTRY_POINTS = {
    "apache_airflow_provider": {"provider_info": f"{PACKAGE}.get_provider_info:get_provider_info"},
    "airflow.plugins": {"o365mail": f"{PACKAGE}.plugins.o365mail:O365MailPlugin"},
    "pytest11": {"o365mail_sandbox": f"{PACKAGE}.testing.pytest_plugin"},
}
#: The Microsoft 365 Mail page's templates (plugins/pages.py renders them).
PAGE_TEMPLATES = ["base.html", "index.html", "result.html", "connection_row.html", "page.css", "page.js"]
#: Package data a wheel built without package-data configuration would silently lack.
WHEEL_DATA = [
    f"{PACKAGE}/py.typed",
    f"{PACKAGE}/notifications/templates/body.html",
    f"{PACKAGE}/notifications/templates/subject.jinja2",
    *(f"{PACKAGE}/plugins/templates/{name}" for name in PAGE_TEMPLATES),
    f"{PACKAGE}/testing/pytest_plugin.py",
    f"{PACKAGE}/testing/entra/app.py",
    f"{PACKAGE}/testing/entra/templates/sign_in.html",
]
SDIST_DIRS = ["docs", "tests", "example_dags", "bench", "scripts", "constraints"]
SDIST_FILES = ["LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "MANIFEST.in", "mkdocs.yml"]
#: Local files that must never ship (sandbox credentials, venvs, demo state).
NEVER = (".sandbox.env", ".venv/", ".airflow-demo/", "__pycache__/", ".pyc", ".git/", "/site/")
CLASSIFIERS = [
    "Framework :: Apache Airflow",
    "Framework :: Apache Airflow :: Provider",
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.12",
    "Programming Language :: Python :: 3.13",
    "Operating System :: OS Independent",
    "Typing :: Typed",
]
PROJECT_URLS = ["Homepage", "Documentation", "Source", "Changelog", "Issues"]


def source_files(root: Path, sub: str) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in (root / sub).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def check_wheel(wheel: Path, source: Path) -> list[str]:
    problems: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.optionxform = str  # keep the case of entry point names
        entry_points.read_string(zf.read(f"{dist_info}/entry_points.txt").decode())
    tops = {n.split("/")[0] for n in names}
    if tops != {PACKAGE, dist_info}:
        problems.append(f"wheel: unexpected top-level entries {sorted(tops - {PACKAGE, dist_info})}")
    missing = sorted(source_files(source, PACKAGE) - names)
    if missing:
        problems.append(f"wheel: package files missing: {missing}")
    problems += [f"wheel: {name} missing" for name in WHEEL_DATA if name not in names]
    problems += [f"wheel: ships {n}" for n in names if any(bad in n for bad in NEVER)]
    if f"{dist_info}/licenses/LICENSE" not in names:
        problems.append("wheel: dist-info/licenses/LICENSE missing")
    for group, expected in ENTRY_POINTS.items():
        actual = dict(entry_points[group]) if entry_points.has_section(group) else {}
        if actual != expected:
            problems.append(f"wheel: entry points [{group}] are {actual}, expected {expected}")
    if metadata["License-Expression"] != "Apache-2.0":
        problems.append(f"wheel: License-Expression is {metadata['License-Expression']!r}")
    classifiers = metadata.get_all("Classifier") or []
    problems += [f"wheel: classifier {c!r} missing" for c in CLASSIFIERS if c not in classifiers]
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL") or [])
    for label in PROJECT_URLS:
        if not urls.get(label, "").startswith(DOCS_SITE if label == "Documentation" else REPO_URL):
            problems.append(f"wheel: Project-URL {label} is {urls.get(label)!r}")
    if metadata["Requires-Python"] != ">=3.11":
        problems.append(f"wheel: Requires-Python is {metadata['Requires-Python']!r}")
    print(f"wheel {wheel.name}: {len(names)} files, entry points {sorted(ENTRY_POINTS)}")
    return problems


def check_sdist(sdist: Path, source: Path) -> list[str]:
    problems: list[str] = []
    with tarfile.open(sdist) as tf:
        members = tf.getnames()
    root = members[0].split("/")[0]
    names = {m[len(root) + 1 :] for m in members if m.startswith(root + "/")}
    for sub in [*SDIST_DIRS, PACKAGE]:
        missing = sorted(source_files(source, sub) - names)
        if missing:
            problems.append(f"sdist: files under {sub}/ missing: {missing[:10]}")
    problems += [f"sdist: {name} missing" for name in SDIST_FILES if name not in names]
    problems += [f"sdist: ships {n}" for n in names if any(bad in n or n.startswith(bad) for bad in NEVER)]
    print(f"sdist {sdist.name}: {len(names)} files")
    return problems


def main(dist: Path, source: Path) -> int:
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {dist}, found {[p.name for p in dist.iterdir()]}")
        return 1
    problems = check_wheel(wheels[0], source) + check_sdist(sdists[0], source)
    for problem in problems:
        print(f"PROBLEM {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
