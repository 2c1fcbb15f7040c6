"""How the command line tells its own options from the command, and which
options belong to which mode.

The rules are those of command runners such as ``sudo``, ``env`` and
``timeout``: options come first; the first word that is not an option (or
the word after ``--``) starts the command, and every word from there on
belongs to it. argparse alone would take options from anywhere on the line,
so the split is made here, with argparse's own table of options, and
argparse then parses the options part only.

Three modes: without a command the program is the server; with one it is a
client; with ``--status`` it asks a server for its figures. An option of
another mode is an error with a hint, never silently ignored.
"""

from __future__ import annotations

import argparse
import shlex
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Sequence, Tuple

#: The titles of the argument groups: they decide which mode an option belongs to.
CLIENT_OPTIONS = "client options"
SERVER_OPTIONS = "server options"
STATUS_OPTIONS = "status options"
#: Client options that also apply to ``--status`` (it is a client too).
_STATUS_TOO = {"trust_uid"}
#: Words that commands commonly take themselves: never mistaken for ours after the command.
_COMMON_WORDS = {"-h", "--help", "--version"}

if TYPE_CHECKING:
    Given = List[Tuple[str, argparse.Action]]
    Split = Tuple[List[str], List[str], bool, Given]


def _action(parser: argparse.ArgumentParser, word: str) -> Tuple[Optional[argparse.Action], bool]:
    """The option ``word`` names, and whether its value is attached to it."""
    table = parser._option_string_actions
    if word in table:
        return table[word], False
    if word.startswith("--") and "=" in word:
        return table.get(word.split("=", 1)[0]), True
    if not word.startswith("--") and len(word) > 2 and word[:2] in table:
        return table[word[:2]], True
    return None, False


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs is None or action.nargs == 1


def split_command(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> Tuple[List[str], List[str], bool, Given]:
    """Split ``argv`` into (options, command, ended_by_dashes, given options)."""
    given: Given = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return list(argv[:i]), list(argv[i + 1 :]), True, given
        if not word.startswith("-") or word == "-":
            break
        action, attached = _action(parser, word)
        if action is not None:
            given.append((word.split("=", 1)[0] if word.startswith("--") else word[:2], action))
            if _takes_value(action) and not attached:
                i += 1  # its value, whatever it looks like
        i += 1
    return list(argv[:i]), list(argv[i:]), False, given


def _group_of(parser: argparse.ArgumentParser, action: argparse.Action) -> Optional[str]:
    for group in parser._action_groups:
        if action in group._group_actions:
            return group.title
    return None


def _check_command(parser: argparse.ArgumentParser, options: List[str], command: List[str]) -> None:
    """Refuse errand-boy options after the command, and a shell line among other words."""
    prog = parser.prog
    for index, word in enumerate(command[1:], 1):
        action, attached = _action(parser, word)
        if action is None or word in _COMMON_WORDS or not word.startswith("--"):
            continue
        moved = command[index : index + (1 if attached or not _takes_value(action) else 2)]
        rest = command[:index] + command[index + len(moved) :]
        fixed = " ".join(shlex.quote(w) for w in [*options, *moved, *rest])
        verbatim = " ".join(shlex.quote(w) for w in [*options, "--", *command])
        message = f"{word} comes after the command: errand-boy's options go before it, as in: {prog} {fixed}"
        if not any(c.isspace() for c in command[0]):  # a program, not a shell line
            message += f"   To give {word} to the program itself, put -- first: {prog} {verbatim}"
        parser.error(message)
    if len(command) > 1 and any(c.isspace() for c in command[0]):
        parser.error(
            f"{command[0]!r} looks like a shell command line, but other arguments follow it. "
            "One argument is a shell command line; several are a program and its arguments, run "
            f"without a shell. Quote the whole command line as one argument: {prog} [OPTIONS] "
            f"{shlex.quote(' '.join(command))}"
        )


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; ``args.command`` is the command's words (empty for the server)."""
    options, command, ended, given = split_command(parser, argv)
    args = parser.parse_args(options)
    args.command = command
    if ended and not command:
        parser.error("nothing follows --: give the command to run after it")
    if not ended:
        _check_command(parser, options, command)
    mode = "status" if args.status else "client" if command else "server"
    prog = parser.prog
    for word, action in given:
        group = _group_of(parser, action)
        if group == SERVER_OPTIONS and mode != "server":
            where = "with --status" if mode == "status" else "with a COMMAND (a client run)"
            parser.error(
                f"{word} is a server option and means nothing {where}. Drop it here, and give it "
                f"to the server instead (the server runs without a COMMAND: {prog} {word} ...)"
            )
        if group == CLIENT_OPTIONS and mode == "status" and action.dest not in _STATUS_TOO:
            parser.error(f"{word} applies to a COMMAND and means nothing with --status")
        if group == CLIENT_OPTIONS and mode == "server" and action.dest not in ("timeout",):
            parser.error(
                f"{word} applies to a COMMAND run through the server. Give the command after the "
                f"options ({prog} {word} ... COMMAND), or drop {word} to run the server"
            )
        if action.dest == "json" and not args.status:
            parser.error("--json goes with --status")
    if args.status and command:
        parser.error(f"--status takes no COMMAND (got {shlex.join(command)!r})")
    if mode == "server" and args.timeout is not None:
        # Before 1.0 --timeout also named the server's default: still honoured.
        if args.default_timeout is not None:
            parser.error("--timeout without a COMMAND is the old spelling of --default-timeout: give one")
        print(
            f"{prog}: warning: --timeout without a COMMAND is deprecated; "
            "use --default-timeout for the server's default timeout",
            file=sys.stderr,
        )
        args.default_timeout = args.timeout
    return args
