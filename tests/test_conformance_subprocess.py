"""CPython's own test_subprocess.py, with Popen and run routed through errand-boy.

The interpreter's ``test`` package holds the standard library's tests. This
module starts a real server, replaces ``subprocess.Popen`` (which
``subprocess.call``, ``check_output`` and friends use) and ``subprocess.run``
with errand-boy's, and lets pytest collect the test classes that concern a
``Popen`` made by another process: ``ProcessTestCase``, ``RunFuncTestCase``
and ``ContextManagerTests``.

Two lists keep the result honest:

* ``EXCLUDED``: tests that cannot apply to a command run by a daemon (each
  with its reason); they are skipped.
* ``DEVIATIONS``: tests that fail because of a documented difference from
  subprocess; they are strict ``xfail``, so a fix that makes one pass must
  also take it off the list.

Where the ``test`` package is absent (some distributions split it off),
the module is skipped with that reason.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tempfile
import unittest
from typing import Any, Dict, Iterator

import pytest
from conftest import ServerProcess

from errand_boy import client

try:
    from test import test_subprocess as cpython
except ImportError as exc:  # pragma: no cover - depends on the distribution
    pytest.skip(f"the interpreter's test package is absent ({exc}): nothing to run", allow_module_level=True)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # CPython's tests make warnings of their own (ResourceWarning for
    # streams they leave to the garbage collector, DeprecationWarning).
    pytest.mark.filterwarnings("ignore"),
]

_DAEMON = "the command is started by the server, not by this process: "

#: Tests that cannot apply to a daemon's command, and why.
_EXECUTABLE_TESTS = (
    "test_executable",
    "test_executable_takes_precedence",
    "test_executable_replaces_shell",
    "test_executable_with_cwd",
    "test_executable_without_cwd",
    "test_bytes_executable",
    "test_pathlike_executable",
    "test_bytes_executable_replaces_shell",
    "test_pathlike_executable_replaces_shell",
    "test_cwd_with_relative_executable",
)
_NO_EXECUTABLE = _DAEMON + "executable= is not supported (the server runs argv[0], or /bin/sh for shell=True)"

EXCLUDED: Dict[str, str] = {
    **dict.fromkeys(_EXECUTABLE_TESTS, _NO_EXECUTABLE),
    "test__use_vfork": "mocks subprocess's private _fork_exec, which a daemon's command never reaches",
    "test_repr": "mocks subprocess.Popen._execute_child, which the proxy does not have",
}

#: Tests that fail because of a difference from subprocess not fixed yet.
DEVIATIONS: Dict[str, str] = {}

_SUBPROCESS_POPEN = subprocess.Popen
_SUBPROCESS_RUN = subprocess.run
_POPEN_SIGNATURE = inspect.signature(subprocess.Popen.__init__)
#: subprocess's arguments that errand-boy does not take: passed on only when
#: not at subprocess's default, so that the proxy refuses them itself.
_LOCAL_ONLY = {
    "executable": None, "preexec_fn": None, "close_fds": True, "startupinfo": None, "creationflags": 0,
    "restore_signals": True, "start_new_session": False, "pass_fds": (), "user": None, "group": None,
    "extra_groups": None, "umask": -1, "process_group": None,
}  # fmt: skip

_socket_path = ""


class ProxyPopen(client.Popen):
    """errand-boy's Popen with subprocess.Popen's signature and defaults
    (inheritance, not PIPE), on the test server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = _POPEN_SIGNATURE.bind(None, *args, **kwargs)
        options = dict(bound.arguments)
        options.pop("self")
        options.update(options.pop("kwargs", {}))
        argv = options.pop("args")
        for name, default in _LOCAL_ONLY.items():
            if name in options and _same(options[name], default):
                del options[name]
        for name in ("stdin", "stdout", "stderr"):
            options.setdefault(name, None)
        super().__init__(argv, socket_path=_socket_path, **options)


def _same(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _proxy_run(*args: Any, **kwargs: Any) -> Any:
    return client.run(*args, socket_path=_socket_path, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def routed_through_errand_boy() -> Iterator[None]:
    global _socket_path
    directory = tempfile.mkdtemp(prefix="eb-conf-")
    server = ServerProcess(os.path.join(directory, "sock"), ["--pool-size", "2", "--max-concurrent", "64"])
    _socket_path = server.socket_path
    subprocess.Popen = ProxyPopen  # type: ignore[misc]
    subprocess.run = _proxy_run
    try:
        yield
    finally:
        subprocess.Popen = _SUBPROCESS_POPEN  # type: ignore[misc]
        subprocess.run = _SUBPROCESS_RUN
        server.stop()
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def _routed(base: type) -> type:
    """A subclass of ``base`` whose excluded and deviating tests are marked."""
    namespace: Dict[str, Any] = {}
    for name in unittest.TestLoader().getTestCaseNames(base):
        if name in EXCLUDED:
            namespace[name] = unittest.skip(f"excluded: {EXCLUDED[name]}")(getattr(base, name))
        elif name in DEVIATIONS:
            namespace[name] = pytest.mark.xfail(reason=DEVIATIONS[name], strict=True)(getattr(base, name))
    return type(f"Test{base.__name__}", (base,), namespace)


TestProcessTestCase = _routed(cpython.ProcessTestCase)
TestRunFuncTestCase = _routed(cpython.RunFuncTestCase)
TestContextManagerTests = _routed(cpython.ContextManagerTests)


def test_the_proxy_is_what_runs() -> None:
    """Guard: the collected tests really use errand-boy."""
    assert subprocess.Popen is ProxyPopen
    with subprocess.Popen(
        [sys.executable, "-c", "import os; print(os.getppid())"], stdout=subprocess.PIPE
    ) as p:
        parent = int(p.stdout.read())  # type: ignore[union-attr]
    assert parent != os.getpid()
    assert isinstance(p, client.Popen)
