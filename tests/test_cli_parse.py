"""The command line's parsing: which words are options, which the command,
and which options belong to which mode. In-process: argparse only, no server."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import List

import pytest

from errand_boy import run


def parse(*argv: str) -> argparse.Namespace:
    return run.parse_command_line(run.build_parser(), list(argv))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err
    return " ".join(err.split("error: ", 1)[1].split())


def test_no_command_is_the_server() -> None:
    args = parse("--socket", "/x", "--pool-size", "3", "--default-timeout", "5")
    assert (args.command, args.pool_size, args.default_timeout, args.socket) == ([], 3, 5.0, "/x")


def test_one_argument_is_a_shell_command_line() -> None:
    assert parse("ls -al | head").command == ["ls -al | head"]


def test_the_first_word_that_is_not_an_option_starts_the_command() -> None:
    args = parse("--timeout", "1", "--cwd", "/tmp", "ls", "-d", "-n", "/")
    assert args.command == ["ls", "-d", "-n", "/"]
    assert (args.timeout, args.cwd, args.pass_stdin) == (1.0, "/tmp", True)


@pytest.mark.parametrize("argv", [["--", "ls", "-d", "/"], ["--timeout=2", "--", "ls", "-d", "/"]])
def test_double_dash_ends_the_options(argv: List[str]) -> None:
    assert parse(*argv).command == ["ls", "-d", "/"]


def test_after_double_dash_our_option_names_belong_to_the_command() -> None:
    assert parse("--", "grep", "--timeout", "x").command == ["grep", "--timeout", "x"]
    assert parse("-n", "--", "--cwd").command == ["--cwd"]


def test_option_values_that_look_like_options_or_commands_are_values() -> None:
    args = parse("--cwd=-weird-dir", "--socket", "ls", "true")
    assert (args.cwd, args.socket, args.command) == ("-weird-dir", "ls", ["true"])
    assert parse("-t", "errand_boy.transports.unixsocket.UNIXSocketTransport", "true").command == ["true"]
    assert parse("-terrand_boy.x.Y", "true").transport == "errand_boy.x.Y"


def test_options_after_a_shell_command_are_an_error_with_the_fix(capsys) -> None:
    message = usage_error(capsys, "echo hi", "--timeout", "1")
    assert message.startswith("--timeout comes after the command")
    assert "--timeout 1 'echo hi'" in message  # the corrected line


def test_options_after_a_program_are_an_error_naming_both_fixes(capsys) -> None:
    message = usage_error(capsys, "ls", "-al", "--cwd=/tmp")
    assert "--cwd=/tmp ls -al" in message
    assert "-- ls -al --cwd=/tmp" in message


def test_common_option_words_after_a_program_are_the_programs() -> None:
    assert parse("python3", "--version").command == ["python3", "--version"]
    assert parse("ls", "-t", "-n").command == ["ls", "-t", "-n"]


def test_a_shell_line_followed_by_words_is_an_error(capsys) -> None:
    message = usage_error(capsys, "echo hi", "there")
    assert "looks like a shell command line" in message
    assert "'echo hi there'" in message


@pytest.mark.parametrize("option", [["--pool-size", "3"], ["--max-accepts=1"], ["--default-timeout", "2"]])
def test_server_options_in_client_mode_are_an_error(capsys, option: List[str]) -> None:
    message = usage_error(capsys, *option, "echo hi")
    assert message.startswith(f"{option[0].split('=')[0]} is a server option")
    assert "with a COMMAND" in message


def test_server_options_with_status_are_an_error(capsys) -> None:
    assert "with --status" in usage_error(capsys, "--status", "--pool-size", "2")


@pytest.mark.parametrize(
    "option", [["--cwd", "/"], ["-n"], ["--server-env"], ["--frames"], ["--trust-uid", "0"]]
)
def test_client_options_without_a_command_are_an_error(capsys, option: List[str]) -> None:
    assert "applies to a COMMAND" in usage_error(capsys, *option)


def test_status_takes_trust_uid_but_no_command_or_cwd(capsys) -> None:
    assert parse("--status", "--trust-uid", "0", "--trust-uid", "root").trust_uid == [0, 0]
    assert "--status takes no COMMAND" in usage_error(capsys, "--status", "true")
    assert "means nothing with --status" in usage_error(capsys, "--status", "--cwd", "/")


def test_json_needs_status(capsys) -> None:
    assert "--json goes with --status" in usage_error(capsys, "--json")


def test_nothing_after_double_dash(capsys) -> None:
    assert "nothing follows --" in usage_error(capsys, "--timeout", "1", "--")


def test_client_flags_for_the_transport() -> None:
    args = parse("--trust-uid", "1234", "--server-env", "--frames", "true")
    assert (args.trust_uid, args.server_env, args.frames) == ([1234], True, True)
    args = parse("true")
    assert (args.trust_uid, args.server_env, args.frames) == ([], False, False)


def test_bad_trust_uid_is_a_usage_error(capsys) -> None:
    assert "--trust-uid" in usage_error(capsys, "--trust-uid", "no-such-user-h6", "true")


def test_server_timeout_keeps_working_with_a_deprecation_note(capsys) -> None:
    args = parse("--timeout", "3")
    assert args.default_timeout == 3.0
    assert "deprecated; use --default-timeout" in capsys.readouterr().err
    assert "old spelling" in usage_error(capsys, "--timeout", "3", "--default-timeout", "4")


def test_no_abbreviations() -> None:
    # `--time 5 cmd` must not silently mean --timeout (a prefix could change meaning later).
    with pytest.raises(SystemExit):
        parse("--time", "5")


def test_help_shows_examples_and_every_mode(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse("--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "printf '%s\\n' a 'b c'" in out
    for title in ("client options", "server options", "status options"):
        assert title in out


def test_every_option_belongs_to_a_mode_or_to_all() -> None:
    parser = run.build_parser()
    titles = {group.title: group for group in parser._action_groups}
    assert {"client options", "server options", "status options"} <= set(titles)
    server = {a.dest for a in titles["server options"]._group_actions}
    client = {a.dest for a in titles["client options"]._group_actions}
    assert not server & client
    assert {"timeout", "cwd", "trust_uid", "server_env", "frames"} <= client
    assert {"default_timeout", "pool_size"} <= server


def test_help_piped_into_a_closed_pipe_is_quiet() -> None:
    # `--help | true`: no BrokenPipeError traceback.
    done = subprocess.run(
        f"{sys.executable} -m errand_boy.run --help | true; echo ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr == ""
    assert done.stdout.strip() in ("0", "141")
