"""Click help listings that show each command's whole first sentence (Click cuts it to one line ending in '...')."""

from __future__ import annotations

import re

import click


def first_sentence(cmd: click.Command) -> str:
    """The command's short help, or the first sentence of its help on one line (wrapped by the listing)."""
    paragraph = " ".join((cmd.help or "").split("\n\n")[0].split())
    return cmd.short_help or re.split(r"(?<=\.)\s+(?=[A-Z`])", paragraph)[0]


class Group(click.Group):
    """A group whose command listing wraps each description instead of truncating it."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, first_sentence(cmd)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
