"""What every command shares: printing a report as text or one JSON object, and option types.

Command modules import only click and torch-free parts of the library at the top, and the library
itself inside the command, so `sftools --help` and usage errors answer at once.
"""

from __future__ import annotations

import json

import click

from sftools.io.units import parse_size


def emit(report: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        for line in lines:
            click.echo(line)


class SizeType(click.ParamType):
    """`5GB`, `500MB`, `2GiB` -> bytes; anything else is a usage error."""

    name = "SIZE"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text.")
OUTPUT_OPTION = click.option("-o", "--output", required=True, metavar="OUT.safetensors",
                             help="The file to write (written under a temporary name, renamed when verified).")
