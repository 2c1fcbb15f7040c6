"""The command line: ``python -m errand_boy.run`` (also ``errand-boy``).

Without a command it runs the server; with one it is a client that runs the
command through the server, streams its output and exits with its status::

    python -m errand_boy.run                 # serve on /tmp/errand-boy
    python -m errand_boy.run 'ls -al'        # run a command through it
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, List, Optional

from . import __version__
from .defaults import DEFAULT_SOCKET_PATH, SOCKET_ENV
from .protocol import DEFAULT_MAX_REQUEST_BYTES

DEFAULT_TRANSPORT = "errand_boy.transports.unixsocket.UNIXSocketTransport"
#: The exit status when errand-boy itself failed (as ``docker run`` and ``env`` use it).
EXIT_ERRAND_BOY_FAILED = 125


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds greater than 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m errand_boy.run",
        description=(
            "Without COMMAND: run the errand-boy server. With COMMAND: run it through the "
            "server, stream its output, and exit with its exit status (128+N when signal N "
            "ended it; 125 when errand-boy itself failed)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"errand-boy {__version__}")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the server's Unix socket (default: ${SOCKET_ENV}, else {DEFAULT_SOCKET_PATH})",
    )
    parser.add_argument(
        "-t", "--transport", metavar="DOTTED.PATH", default=DEFAULT_TRANSPORT,
        help=f"transport class (default: {DEFAULT_TRANSPORT})",
    )
    server = parser.add_argument_group("server options")
    server.add_argument("--pool-size", type=_positive_int, metavar="N",
                        help="worker processes (default: the number of CPUs)")
    server.add_argument("--max-accepts", type=_positive_int, default=0, metavar="N",
                        help="exit after N connections, once they are served (default 0: no limit)")
    server.add_argument("--max-child-tasks", type=_positive_int, default=0, metavar="N",
                        help="replace a worker after N commands (default 0: never)")
    server.add_argument("--max-request-bytes", type=_positive_int, default=DEFAULT_MAX_REQUEST_BYTES,
                        metavar="N", help="largest command block accepted (default: 1 MiB)")
    server.add_argument("--log-level", default="INFO", metavar="LEVEL",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
                        help="DEBUG, INFO (default), WARNING or ERROR")
    client = parser.add_argument_group("client options")
    client.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help="kill the command's process group after this long")
    client.add_argument("--cwd", metavar="DIR", help="run the command in DIR")
    client.add_argument("-n", dest="pass_stdin", action="store_false",
                        help="do not pass standard input on (it is passed when it is not a terminal)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="a shell command; several words are joined with spaces, as ssh does")
    return parser


def load_transport(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"--transport needs a dotted path like {DEFAULT_TRANSPORT}, not {dotted!r}")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        transport_cls = load_transport(args.transport)
    except (ImportError, AttributeError, ValueError) as exc:
        parser.error(f"cannot load transport {args.transport!r}: {exc}")
    transport = transport_cls(args.socket)
    if args.command:
        return run_client(transport, args)
    return run_server(transport, args)


def run_server(transport: Any, args: argparse.Namespace) -> int:
    from .server import AlreadyRunning, configure_logging

    configure_logging(args.log_level)
    try:
        return int(
            transport.run_server(
                pool_size=args.pool_size,
                max_accepts=args.max_accepts,
                max_child_tasks=args.max_child_tasks,
                max_request_bytes=args.max_request_bytes,
            )
            or 0
        )
    except AlreadyRunning as exc:
        print(f"errand-boy: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"errand-boy: cannot serve on {transport.socket_path}: {exc}", file=sys.stderr)
        return 1


def run_client(transport: Any, args: argparse.Namespace) -> int:
    from ._cli_client import run_command_line

    command = " ".join(args.command)
    pass_stdin = args.pass_stdin and not os.isatty(0)
    return run_command_line(
        command,
        socket_path=transport.socket_path,
        timeout=args.timeout,
        cwd=args.cwd,
        pass_stdin=pass_stdin,
    )


if __name__ == "__main__":
    sys.exit(main())
