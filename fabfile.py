"""Developer tasks, with Fabric 3 (``pip install 'fabric>=3'``); local only.

::

    fab locust_local                                   # 10 users for 10 s
    fab locust_local --run-time 30s --users 50 --spawn-rate 25 --pool-size 4

(``fabric.yaml`` beside this file keeps the underscore in the task's name.)

``locust_local`` starts an errand-boy server on a private socket (in a
temporary directory), waits until it answers, runs ``locustfile.py``
headless against it, prints locust's statistics, and stops the server
(SIGTERM) whatever happened.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from fabric import task
from invoke.exceptions import Exit

from errand_boy.exceptions import ErrandBoyError
from errand_boy.transports.unixsocket import UNIXSocketTransport

HERE = os.path.dirname(os.path.abspath(__file__))
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


def _wait_ready(transport: UNIXSocketTransport, promise: object) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            transport.status()
            return
        except (OSError, ErrandBoyError):
            pass
        runner = getattr(promise, "runner", None)
        if runner is not None and runner.process_is_finished:
            raise RuntimeError("the errand-boy server exited before it answered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the errand-boy server did not answer within {READY_TIMEOUT:.0f} s")
        time.sleep(0.05)


@task
def locust_local(c, run_time="10s", users=10, spawn_rate=10, pool_size=None):
    """Load-test a private errand-boy server with locust; print the statistics."""
    workdir = tempfile.mkdtemp(prefix="eb-locust-")
    socket_path = os.path.join(workdir, "sock")
    python = shlex.quote(sys.executable)
    server_cmd = (
        f"exec {python} -m errand_boy.run --socket {shlex.quote(socket_path)}"
        f" --max-accepts=0 --log-level WARNING"
    )
    if pool_size:
        server_cmd += f" --pool-size {int(pool_size)}"
    promise = None
    try:
        with c.cd(HERE):
            # `exec`: the shell becomes the server, so the pid is the master's.
            promise = c.run(server_cmd, asynchronous=True, warn=True, pty=False, in_stream=False)
            _wait_ready(UNIXSocketTransport(socket_path), promise)
            print(f"errand-boy server {promise.runner.process.pid} on {socket_path}")
            result = c.run(
                f"{python} -m locust -f locustfile.py --headless -u {int(users)} -r {float(spawn_rate):g}"
                f" -t {shlex.quote(str(run_time))} --only-summary",
                env={"ERRAND_BOY_SOCKET": socket_path},
                warn=True,
                in_stream=False,
            )
        if result.failed:
            raise Exit(
                f"locust exited with status {result.exited} (1: some requests failed)", code=result.exited
            )
    finally:
        if promise is not None:
            process = promise.runner.process
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
            promise.join()
        shutil.rmtree(workdir, ignore_errors=True)
