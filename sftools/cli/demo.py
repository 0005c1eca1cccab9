"""sftools demo: the README's main job."""

from __future__ import annotations

import tempfile

import click


@click.command("demo", short_help="Run the whole chain on built-in tiny models.")
@click.option("--workdir", metavar="DIR", help="Where to write the demo files (default: a new temporary folder).")
def demo_cmd(workdir: str | None) -> None:
    """Run the whole chain on built-in tiny models (no downloads) and print, for each stage, what it
    did and the sftools command that does the same."""
    from sftools.demo import run_demo

    workdir = workdir or tempfile.mkdtemp(prefix="sftools-demo-")
    click.echo(f"sftools demo in {workdir}")
    run_demo(workdir, click.echo)
    click.echo("demo finished: every step above ran on local files only")
