"""sftools demo: the README's main job."""

from __future__ import annotations

import tempfile

import click

from sftools.demo import run_demo


@click.command("demo")
@click.option("--workdir", help="Where to write the demo files (default: a new temporary folder).")
def demo_cmd(workdir: str | None) -> None:
    """Run the whole chain on built-in tiny models and print what each step did."""
    workdir = workdir or tempfile.mkdtemp(prefix="sftools-demo-")
    click.echo(f"sftools demo in {workdir}")
    run_demo(workdir, click.echo)
    click.echo("demo finished: every step above ran on local files only")
