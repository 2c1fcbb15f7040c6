"""The distributions: the sdist and the wheel build without network or build
isolation, the wheel holds what an installed package needs, and ``twine
check`` accepts both."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from errand_boy import __version__

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("build", "twine", "setuptools", "wheel"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (python -m pip install '.[packaging]')")
    # Build from a copy: the build writes build/ and *.egg-info next to the sources.
    src = tmp_path_factory.mktemp("src") / "errand-boy"
    ignore = shutil.ignore_patterns(".git", "_build", "build", "dist", "*.egg-info", "__pycache__", ".*cache")
    shutil.copytree(ROOT, src, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--sdist",
            "--wheel",
            "--outdir",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_wheel_holds_the_types_the_license_and_the_console_script(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    assert wheel.name.startswith(f"errand_boy-{__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"errand_boy-{__version__}.dist-info"
        assert "errand_boy/py.typed" in names
        assert any(name.startswith(info) and name.endswith("/LICENSE") for name in names), names
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert "errand-boy = errand_boy.run:main" in entry_points
    assert "Requires-Dist: setproctitle" in metadata
    assert "errand_boy/run.py" in names and "errand_boy/server/worker.py" in names
    assert not any(name.startswith(("tests/", "docs/")) for name in names)


def test_the_sdist_carries_the_tests_and_the_docs(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = ["pyproject.toml", "README.rst", "LICENSE", "errand_boy/py.typed", "docs/conf.py"]
    wanted += ["docs/protocol.rst", "tests/conftest.py", "contrib/errand-boy.service", ".ci/run"]
    for name in wanted:
        assert name in names, name
    assert not any("__pycache__" in name or name.startswith("docs/_build") for name in names)


def test_twine_check_passes(dist: Path) -> None:
    files = sorted(str(path) for path in dist.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout
