"""The command line: ``python -m errand_boy.run`` (also ``errand-boy``).

Without a command it runs the server; with one it is a client that runs the
command through the server, streams its output and exits with its status::

    python -m errand_boy.run                 # serve on /tmp/errand-boy
    python -m errand_boy.run 'ls -al'        # run a shell command line through it
    python -m errand_boy.run ls -al          # run a program with arguments, no shell

The options come first; :mod:`errand_boy._cli_parse` splits them from the
command and checks that each belongs to the mode in use.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from . import __version__
from ._cli_parse import CLIENT_OPTIONS, SERVER_OPTIONS, STATUS_OPTIONS, parse_command_line
from ._ids import group_id, user_id
from .defaults import DEFAULT_SOCKET_PATH, SOCKET_ENV
from .protocol import DEFAULT_MAX_REQUEST_BYTES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

DEFAULT_TRANSPORT = "errand_boy.transports.unixsocket.UNIXSocketTransport"
#: The exit status when errand-boy itself failed (as ``docker run`` and ``env`` use it).
EXIT_ERRAND_BOY_FAILED = 125
#: The exit status when our own standard output was closed (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141

DESCRIPTION = """\
Without COMMAND: run the errand-boy server. With COMMAND: run it through the
server, stream its output, and exit with its exit status (128+N when signal N
ended it; 125 when errand-boy itself failed; 2 for a usage error).

One COMMAND argument is a shell command line, run by /bin/sh -c; several are a
program and its arguments, run without a shell. errand-boy's options go before
the command; -- ends them."""

EXAMPLES = """\
examples:
  %(prog)s                                  run the server on the default socket
  %(prog)s --pool-size 4 --default-timeout 600
  %(prog)s 'ls -al | head'                  a shell command line (one argument)
  %(prog)s printf '%%s\\n' a 'b c'            a program and its arguments, no shell
  %(prog)s --timeout 10 --cwd /srv make     client options go before the command
  %(prog)s -- grep --timeout x file         -- ends errand-boy's options
  %(prog)s --status                         the server's figures (exit 1: no server)
"""


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


def build_parser(prog: str = "python -m errand_boy.run") -> argparse.ArgumentParser:
    """The command line's parser; :func:`main` splits off the command first (see :mod:`._cli_parse`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=(
            f"{prog} [OPTIONS]                  (run the server)\n"
            f"       {prog} [OPTIONS] [--] COMMAND [ARG ...]  (run a command through it)\n"
            f"       {prog} --status [--json]"
        ),
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"errand-boy {__version__}")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the server's Unix socket (default: ${SOCKET_ENV}, else {DEFAULT_SOCKET_PATH})",
    )
    parser.add_argument(
        "-t",
        "--transport",
        metavar="DOTTED.PATH",
        default=DEFAULT_TRANSPORT,
        help=f"transport class (default: {DEFAULT_TRANSPORT})",
    )
    client = parser.add_argument_group(CLIENT_OPTIONS, "with COMMAND: run it through the server")
    # fmt: off
    client.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help="kill the command's process group after this long")
    client.add_argument("--cwd", metavar="DIR", help="run the command in DIR")
    client.add_argument("-n", dest="pass_stdin", action="store_false",
                        help="do not pass standard input on (give the command /dev/null; with --frames a "
                             "terminal is never passed)")
    client.add_argument("--server-env", action="store_true",
                        help="run the command in the server's working directory and environment")
    client.add_argument("--frames", action="store_true",
                        help="carry the command's input and output in frames through the server "
                             "instead of passing this process's descriptors")
    client.add_argument("--trust-uid", type=_uid, action="append", default=[], metavar="UID",
                        help="also talk to a server running as this user (name or number; by default "
                             "only root and your own user are trusted); repeatable; also with --status")
    # fmt: on
    status = parser.add_argument_group(STATUS_OPTIONS)
    status.add_argument(
        "--status",
        action="store_true",
        help="print the running server's figures and exit (non-zero when it is not reachable)",
    )
    status.add_argument("--json", action="store_true", help="with --status: print the status reply as JSON")
    server = parser.add_argument_group(SERVER_OPTIONS, "without COMMAND: run the server")
    # fmt: off
    server.add_argument("--default-timeout", type=_seconds, metavar="SECONDS",
                        help="kill commands whose request sets no timeout after this long "
                             "(formerly --timeout without a COMMAND)")
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
    # fmt: on
    parser.add_argument(
        "command",
        nargs="*",
        metavar="COMMAND",
        help="one argument: a shell command line; several: a program and its arguments (no shell)",
    )
    return parser


def load_transport(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"--transport needs a dotted path like {DEFAULT_TRANSPORT}, not {dotted!r}")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: Optional[List[str]] = None) -> int:
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    parser = build_parser("errand-boy") if name == "errand-boy" else build_parser()
    try:
        args = parse_command_line(parser, sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, --version, a usage error
        return EXIT_BROKEN_PIPE if _stdout_broken() else _exit_code(exc)
    except BrokenPipeError:  # --help into a closed pipe (argparse lets it through before 3.11)
        _stdout_broken()
        return EXIT_BROKEN_PIPE
    try:
        transport_cls = load_transport(args.transport)
    except (ImportError, AttributeError, ValueError) as exc:
        parser.error(f"cannot load transport {args.transport!r}: {exc}")
    # Passed only when asked for, so that a transport without them still works.
    extras: Dict[str, Any] = {}
    if args.trust_uid:
        extras["trusted_uids"] = args.trust_uid
    if args.server_env:
        extras["server_env"] = True
    if args.frames:
        extras["frames"] = True
    try:
        transport = transport_cls(args.socket, **extras)
    except TypeError as exc:
        options = ", ".join("--" + name.replace("_", "-") for name in ("trust_uid", "server_env", "frames")
                            if getattr(args, name))  # fmt: skip
        parser.error(f"the transport {args.transport} does not take {options}: {exc}")
    if args.status:
        return show_status(transport, as_json=args.json)
    if args.command:
        return run_client(transport, args)
    return run_server(transport, args)


def _exit_code(exc: SystemExit) -> int:
    return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2


def _stdout_broken() -> bool:
    """Flush standard output; True (and output silenced) if its reader has gone."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        from ._cli_client import _silence_stdout

        _silence_stdout()
        return True
    return False


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
                timeout=args.default_timeout,
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
    from ._cli_errors import explain
    from .exceptions import ErrandBoyError

    try:
        info = transport.status()
    except (ErrandBoyError, OSError) as exc:
        print(f"errand-boy: {explain(exc, transport.socket_path)}", file=sys.stderr)
        return 1
    text = (
        json.dumps(info, indent=2, sort_keys=True) if as_json else format_status(info, transport.socket_path)
    )
    try:
        print(text)
    except BrokenPipeError:  # `--status | true`: exit as a command killed by SIGPIPE
        _stdout_broken()
        return EXIT_BROKEN_PIPE
    return EXIT_BROKEN_PIPE if _stdout_broken() else 0


def run_client(transport: Any, args: argparse.Namespace) -> int:
    from ._cli_client import run_command_line

    # One argument is a shell command line; several are argv, run without a shell.
    command = args.command[0] if len(args.command) == 1 else list(args.command)
    # A terminal is passed as it is, like any descriptor; only frames, which
    # would relay it byte by byte and never see its end, leave it out.
    pass_stdin = args.pass_stdin and not (args.frames and os.isatty(0))
    return run_command_line(
        command,
        socket_path=transport.socket_path,
        timeout=args.timeout,
        cwd=args.cwd,
        pass_stdin=pass_stdin,
        transport=transport,
    )


if __name__ == "__main__":
    sys.exit(main())
