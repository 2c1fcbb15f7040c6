"""The server in an interpreter of its own: what ``python -m errand_boy.run`` becomes.

The command line parses its options with :mod:`argparse`, its help texts
and their helpers, none of which serving needs. Loaded in the process that
then became the master, they would stay in the master and in every worker
it forks: about 1 MB of shared pages, part of them copied by each worker.
So once the options are known, the command line replaces itself
(``os.execv``: the same process, the same pid, descriptors and
environment) with a fresh interpreter that imports the server only, and
hands it the options as JSON (see ``become_server`` in :mod:`errand_boy.run`).
"""

from __future__ import annotations

import json
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable


def report(serve: Callable[[], Any], socket_path: str) -> int:
    """Run ``serve()`` as the command line does: an error is one line on
    standard error and an exit status (1, or 2 for a bad option)."""
    from .listener import AlreadyRunning

    try:
        return int(serve() or 0)
    except AlreadyRunning as exc:
        print(f"errand-boy: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"errand-boy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"errand-boy: cannot start the server (socket {socket_path}): {exc}", file=sys.stderr)
        return 1


def main(text: str) -> int:
    """Serve with the options the command line passed (JSON: :func:`serve`'s
    keywords, and ``log_level`` and ``log_format``)."""
    options = json.loads(text)
    from . import configure_logging, serve

    configure_logging(options.pop("log_level"), options.pop("log_format"))
    socket_path = options["socket_path"]
    return report(lambda: serve(**options), socket_path)
