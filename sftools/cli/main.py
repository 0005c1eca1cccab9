"""The `sftools` command: one group, one module per command, named like it."""

from __future__ import annotations

import logging
import sys

import click

from sftools import __version__
from sftools.cli.convert import convert_cmd
from sftools.cli.demo import demo_cmd
from sftools.cli.inspect_cmd import inspect_cmd
from sftools.cli.lora import lora_group
from sftools.cli.sample import sample_cmd
from sftools.cli.scan import scan_cmd
from sftools.cli.train import train_cmd
from sftools.cli.vace import vace_group
from sftools.cli.verify import verify_cmd
from sftools.errors import SettingsError, SftoolsError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="sftools")
def cli() -> None:
    """Safe weight tools, LoRA extraction and causal sampling for Wan 2.1 and Self Forcing models."""


for command in (scan_cmd, inspect_cmd, convert_cmd, lora_group, vace_group, sample_cmd, verify_cmd, train_cmd, demo_cmd):
    cli.add_command(command)


class _NoteHandler(logging.Handler):
    """Library notes (a stale temporary file removed) as one line on stderr each."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"sftools: note: {record.getMessage()}", err=True)


def main() -> None:
    """Run the CLI; a user mistake is one line on stderr and exit 1 (2 for usage), never a traceback."""
    log = logging.getLogger("sftools")
    if not any(isinstance(h, _NoteHandler) for h in log.handlers):
        log.addHandler(_NoteHandler())
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SettingsError as exc:  # a value out of range: a usage error, as click's own are
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except SftoolsError as exc:
        click.echo(f"sftools: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # unreadable input, read-only folder, full disk: the system's own words
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"sftools: error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
