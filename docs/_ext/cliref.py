"""A Sphinx directive that renders errand-boy's command-line parser.

``.. errand-boy-cli::`` writes the usage, the description, every option group
with every option (its names, its value, its help and its default) and the
examples, all taken from :func:`errand_boy.run.build_parser` at build time,
so the page cannot drift from the program.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def _names(action: argparse.Action) -> str:
    value = f" {action.metavar or action.dest.upper()}" if action.nargs != 0 else ""
    if action.choices and not action.metavar:
        value = " {" + ",".join(map(str, action.choices)) + "}"
    return ", ".join(f"``{name}{value}``" for name in action.option_strings)


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    shown = not isinstance(action.default, bool) and action.default not in (None, [], argparse.SUPPRESS)
    if shown and "default" not in text:
        text += f" (default: ``{action.default}``)"
    return text


def render(parser: argparse.ArgumentParser) -> List[str]:
    """The reST lines for ``parser``."""
    lines = ["Usage::", ""]
    usage = parser.format_usage().rstrip().replace("usage: ", "", 1).splitlines()
    lines += ["    " + usage[0]] + ["    " + line[len("usage: ") :] for line in usage[1:]] + [""]
    lines += [*(parser.description or "").strip().splitlines(), ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not actions:
            continue
        title = group.title or "options"
        lines += [title[0].upper() + title[1:], "~" * len(title), ""]
        if group.description:
            lines += [group.description[0].upper() + group.description[1:] + ".", ""]
        for action in actions:
            head = _names(action) if action.option_strings else f"``{action.metavar or action.dest}``"
            lines += [head, "    " + _help(action), ""]
    if parser.epilog:
        epilog = parser.epilog % {"prog": parser.prog}
        first, _, rest = epilog.partition("\n")
        lines += [first.rstrip(":").capitalize(), "~" * len(first.rstrip(":")), "", "::", ""]
        lines += ["    " + line for line in rest.rstrip().splitlines()] + [""]
    return lines


class CliDirective(SphinxDirective):
    has_content = False

    def run(self) -> List[nodes.Node]:
        from errand_boy.run import build_parser

        section = nodes.section()
        section.document = self.state.document
        content = StringList(render(build_parser()), source="errand_boy.run")
        nested_parse_with_titles(self.state, content, section)
        return list(section.children)


def setup(app: Sphinx) -> Dict[str, Any]:
    app.add_directive("errand-boy-cli", CliDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
