"""A Celery app whose task runs shell commands through errand-boy.

A Celery worker on a gevent (or eventlet) pool is the process errand-boy is
for: big, and running many tasks at once. Each task here asks the
errand-boy server to run its command instead of forking the worker; the
client's blocking sockets are cooperative under the pool's monkey-patching,
so twenty tasks wait for twenty commands at the same time.

Broker and result backend are directories (kombu's ``filesystem://``
transport and Celery's ``file://`` backend), so the example needs no other
server. Run, from the repository's root::

    python -m errand_boy.run --socket /tmp/errand-boy &
    celery -A examples.celery_app worker --pool gevent --concurrency 20 --loglevel INFO

and from Python::

    from examples.celery_app import run_command
    run_command.delay("echo hi").get(timeout=10)
    # {'returncode': 0, 'stdout': 'hi\\n', 'stderr': ''}

Environment: ``ERRAND_BOY_SOCKET`` names the server's socket (default
``/tmp/errand-boy``); ``ERRAND_BOY_CELERY_DIR`` the directory that holds the
broker's and the results' folders (default ``/tmp/errand-boy-celery``). The
worker and the processes that send tasks must agree on both.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping

from celery import Celery

from errand_boy.transports.unixsocket import UNIXSocketTransport

DEFAULT_DIR = "/tmp/errand-boy-celery"


def config_from(environ: Mapping[str, str]) -> Dict[str, Any]:
    """Celery settings for the folders under ``$ERRAND_BOY_CELERY_DIR``
    (created if missing)."""
    base = environ.get("ERRAND_BOY_CELERY_DIR") or DEFAULT_DIR
    folders = {name: os.path.join(base, name) for name in ("queue", "processed", "control", "results")}
    for path in folders.values():
        os.makedirs(path, exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            # One folder both ways: producers write where the worker reads.
            "data_folder_in": folders["queue"],
            "data_folder_out": folders["queue"],
            "processed_folder": folders["processed"],
            "store_processed": True,
            "control_folder": folders["control"],
            "polling_interval": 0.1,  # seconds between looks at an empty queue
        },
        "broker_connection_retry_on_startup": True,
        "result_backend": "file://" + folders["results"],
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
    }


app = Celery("errand_boy_example")
app.conf.update(config_from(os.environ))


@app.task
def run_command(cmd: str) -> Dict[str, Any]:
    """Run the shell command ``cmd`` through errand-boy; its exit status and output."""
    process, stdout, stderr = UNIXSocketTransport().run_cmd(cmd)
    return {
        "returncode": process.returncode,
        "stdout": stdout.decode("utf-8", "replace"),
        "stderr": stderr.decode("utf-8", "replace"),
    }
