"""The `sftools` command: one group, one module per command family."""

from __future__ import annotations

import sys

import click

from sftools import __version__
from sftools.cli.demo import demo_cmd
from sftools.cli.lora import lora_group
from sftools.cli.weights import convert_cmd, inspect_cmd, scan_cmd
from sftools.errors import SftoolsError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sftools")
def cli() -> None:
    """Safe weight tools for Wan 2.1 and Self Forcing models."""


for command in (scan_cmd, inspect_cmd, convert_cmd, lora_group, demo_cmd):
    cli.add_command(command)


def main() -> None:
    """Run the CLI; a user mistake is one line on stderr and exit 1, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SftoolsError as exc:
        click.echo(f"sftools: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # unreadable input, read-only folder, full disk: the system's own words
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"sftools: error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
