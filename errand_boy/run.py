"""The command line: ``python -m errand_boy.run`` (also ``errand-boy``).

Without a command it runs the server; with one it is a client that runs the
command through the server, streams its output and exits with its status::

    python -m errand_boy.run                 # serve on /tmp/errand-boy
    python -m errand_boy.run 'ls -al'        # run a command through it
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Dict, List, Optional

from . import __version__
from ._ids import group_id, user_id
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


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _request_bytes(text: str) -> int:
    value = int(text)
    if value < 65536:
        raise argparse.ArgumentTypeError(f"must be at least 65536 (the protocol's minimum), not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds greater than 0, not {text}")
    return value


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"not a permission mode: {text}")
    return value


def _uid(text: str) -> int:
    try:
        return user_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gid(text: str) -> int:
    try:
        return group_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    parser.add_argument("--status", action="store_true",
                        help="print the running server's figures and exit "
                             "(non-zero when it is not reachable)")
    parser.add_argument("--json", action="store_true", help="with --status: print the status reply as JSON")
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
    server.add_argument("--max-request-bytes", type=_request_bytes, default=DEFAULT_MAX_REQUEST_BYTES,
                        metavar="N", help="largest command block accepted (default: 1 MiB; at least 64 KiB)")
    server.add_argument("--max-buffered-bytes", type=_positive_int, default=64 << 20, metavar="N",
                        help="bytes of incomplete command blocks held across the server; beyond it, "
                             "the clients still sending are not read (default: 64 MiB; 0: no cap)")
    server.add_argument("--max-concurrent", type=_at_least_one, default=256, metavar="N",
                        help="commands running at once across the server; more wait (default 256)")
    server.add_argument("--queue-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                        help="how long a request waits for a place before it gets 'busy' (default 30)")
    server.add_argument("--request-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="close connections that send no complete request within this (default 10)")
    server.add_argument("--graceful-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long running commands may finish before they are "
                             "killed (default 30)")
    server.add_argument("--rlimit", action="append", default=[], metavar="NAME=SOFT[:HARD]",
                        help="a resource limit for every command (nofile, nproc, as, cpu, fsize, core, "
                             "...); repeatable")
    server.add_argument("--containment", choices=["auto", "cgroup", "group"], default="auto",
                        help="how a command's whole process tree is held and killed: a cgroup of its own "
                             "(cgroup; needs cgroup v2 and root or a delegated cgroup), its process group "
                             "(group), or cgroup where possible (auto, the default)")
    server.add_argument("--pidfile", metavar="PATH", help="write the master's pid here, held under a lock")
    server.add_argument("--socket-mode", type=_mode, default=0o600, metavar="MODE",
                        help="permissions of the socket file, in octal (default 0600)")
    server.add_argument("--socket-group", metavar="GROUP", help="group of the socket file")
    server.add_argument("--allow-uid", type=_uid, action="append", default=[], metavar="UID",
                        help="also run commands for this user (name or number); repeatable")
    server.add_argument("--allow-gid", type=_gid, action="append", default=[], metavar="GID",
                        help="also run commands for members of this group (name or number); repeatable")
    server.add_argument("--log-level", default="INFO", metavar="LEVEL",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
                        help="DEBUG, INFO (default), WARNING or ERROR")
    server.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="one line of text (default) or one JSON object per record")
    client = parser.add_argument_group("client options")
    client.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help="kill the command's process group after this long (server: the default "
                             "for commands that set none)")
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
    if args.status:
        return show_status(transport, as_json=args.json)
    if args.command:
        return run_client(transport, args)
    return run_server(transport, args)


def run_server(transport: Any, args: argparse.Namespace) -> int:
    from .server import AlreadyRunning, configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        return int(
            transport.run_server(
                pool_size=args.pool_size,
                max_accepts=args.max_accepts,
                max_child_tasks=args.max_child_tasks,
                max_request_bytes=args.max_request_bytes,
                max_buffered_bytes=args.max_buffered_bytes,
                max_concurrent=args.max_concurrent,
                queue_timeout=args.queue_timeout,
                request_timeout=args.request_timeout,
                graceful_timeout=args.graceful_timeout,
                timeout=args.timeout,
                rlimits=args.rlimit,
                pidfile=args.pidfile,
                socket_mode=args.socket_mode,
                socket_group=args.socket_group,
                allow_uids=args.allow_uid,
                allow_gids=args.allow_gid,
                containment=args.containment,
            )
            or 0
        )
    except AlreadyRunning as exc:
        print(f"errand-boy: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"errand-boy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"errand-boy: cannot start the server (socket {transport.socket_path}): {exc}", file=sys.stderr)
        return 1


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours or days) + [f"{minutes}m", f"{secs}s"]
    return " ".join(parts)


_CONTAINMENT = {"cgroup": "a cgroup per command", "group": "process groups"}


def format_status(info: Dict[str, Any], socket_path: str) -> str:
    """The status reply for a person."""
    latency = info.get("latency") or {}
    lines = [
        f"errand-boy {info.get('version', '?')} on {socket_path} (master pid {info.get('pid', '?')}), "
        f"up {_duration(info.get('uptime'))}",
        f"workers   {info.get('workers', '?')} (pids {', '.join(map(str, info.get('worker_pids', [])))})",
        f"running   {info.get('running', '?')}, queued {info.get('queued', '?')}",
        f"contain   {_CONTAINMENT.get(info.get('containment', '?'), info.get('containment', '?'))}",
        f"served    {info.get('served', '?')}, failed {info.get('failed', '?')}, "
        f"busy {info.get('busy', '?')}, "
        f"connections {info.get('connections', '?')}",
        "latency   " + ", ".join(f"{name} {_duration(value)}" for name, value in sorted(latency.items())),
    ]
    return "\n".join(lines)


def show_status(transport: Any, as_json: bool) -> int:
    from .exceptions import ErrandBoyError

    try:
        info = transport.status()
    except (ErrandBoyError, OSError) as exc:
        print(f"errand-boy: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(format_status(info, transport.socket_path))
    return 0


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
