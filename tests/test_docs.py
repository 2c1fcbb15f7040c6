"""The documentation: the Sphinx site builds with warnings as errors and no
network, the generated command-line reference covers the parser, and no
document points outside the repository."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest

from errand_boy import protocol
from errand_boy.run import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Spelled in pieces so that this file does not trip its own test.
OUTSIDE = ["PROTOCOL" + ".md", "../" + "shared", "/work/" + "shared"]


def option_strings() -> List[str]:
    return [name for action in build_parser()._actions for name in action.option_strings]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("Sphinx is not installed (python -m pip install '.[docs]')")
    out = tmp_path_factory.mktemp("html")
    # Any attempt to reach the network goes to a closed port and fails the build.
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    env["HTTP_PROXY"] = env["HTTPS_PROXY"] = env["http_proxy"]
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    yield out


@pytest.mark.slow
def test_the_site_builds_with_warnings_as_errors(site: Path) -> None:
    for page in ("index", "cli", "api", "reference", "deployment", "protocol", "changelog"):
        assert (site / f"{page}.html").is_file(), page


@pytest.mark.slow
def test_the_cli_reference_has_every_option_and_the_examples(site: Path) -> None:
    html = (site / "cli.html").read_text()
    for name in option_strings():
        assert f">{name}" in html or f"{name} " in html, name
    assert "printf" in html and "examples" in html.lower()


@pytest.mark.slow
def test_the_api_reference_is_generated_from_the_docstrings(site: Path) -> None:
    html = (site / "reference.html").read_text()
    for name in ("UNIXSocketTransport", "run_cmd", "AsyncUNIXSocketTransport", "ServerUnavailable"):
        assert 'id="errand_boy.' in html and name in html, name


def test_the_docs_fetch_nothing() -> None:
    conf = (DOCS / "conf.py").read_text()
    assert "sphinx.ext.intersphinx" not in conf
    assert not re.search(r"https?://", conf)


def repository_text_files() -> List[Path]:
    skip = {".git", "_build", "__pycache__", ".mypy_cache", ".ruff_cache", "build", "dist"}
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for name in filenames:
            text = name.endswith(
                (".py", ".rst", ".md", ".toml", ".txt", ".cfg", ".service", ".socket", ".yaml")
            )
            if text or Path(dirpath).name == ".ci":
                files.append(Path(dirpath, name))
    return files


def test_nothing_points_outside_the_repository() -> None:
    files = repository_text_files()
    assert any(path.name == "protocol.rst" for path in files)
    offenders = [
        f"{path.relative_to(ROOT)}: {needle}"
        for path in files
        for needle in OUTSIDE
        if needle in path.read_text(errors="replace")
    ]
    assert not offenders


def test_the_protocol_page_stands_alone() -> None:
    text = (DOCS / "protocol.rst").read_text()
    assert "version 1 (revision 2)" in text
    for member in ("cmd", "argv", "cwd", "env", "timeout", "stdin", "stdout", "stderr", "op", "pass_fds"):
        assert f"``{member}``" in text, member
    for code in protocol.ERROR_CODES:
        assert f"``{code}``" in text, code
    for kind in "IKPOEX!S":
        assert f"``{kind}``" in text, kind
    for value in (
        '"fd"',
        '"null"',
        '"pipe"',
        '"stdout"',
        '"status"',
        "SCM_RIGHTS",
        "SO_PEERCRED",
        "MSG_CTRUNC",
    ):
        assert value in text, value
    for section in ("Descriptors (revision 2)", "Access", "Limits", "Process model", "The client's check"):
        assert re.search(rf"^{re.escape(section)}.*\n[=~-]+$", text, re.M), section


def test_the_readme_names_only_options_that_exist() -> None:
    readme = (ROOT / "README.rst").read_text()
    section = readme.split("\nThe command line\n", 1)[1].split("\nHow the server works\n", 1)[0]
    known = set(option_strings())
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)\b", section))
    assert named, "the README's command-line section names no option"
    assert named <= known, sorted(named - known)


def test_the_unit_points_at_the_projects_own_docs() -> None:
    unit = (ROOT / "contrib" / "errand-boy.service").read_text()
    links = re.findall(r"^Documentation=(.+)$", unit, re.M)
    assert links, "contrib/errand-boy.service has no Documentation="
    for link in links[0].split():
        assert "pypi.org" not in link, link
        directory, _, page = link.removeprefix("file://").rpartition("/")
        assert (DOCS / page.replace(".html", ".rst")).is_file(), link
        # deployment.rst tells how the pages get there.
        assert f"sphinx-build -b html docs {directory}" in (DOCS / "deployment.rst").read_text()
