"""sftools scan."""

from __future__ import annotations

import sys

import click

from sftools.cli.common import JSON_OPTION, emit
from sftools.io.units import human_bytes


@click.command("scan", short_help="What a checkpoint holds and whether it is safe to read.")
@click.argument("path")
@JSON_OPTION
def scan_cmd(path: str, as_json: bool) -> None:
    """What the checkpoint at PATH holds (every global its pickle references, tensors, dtypes,
    sub-dicts) and whether sftools would read it. Nothing in the file is executed. Exit 1 if refused."""
    from sftools.io.scan import scan_file

    r = scan_file(path)
    lines = [f"{path}: {r['format']}, {'SAFE' if r['safe'] else 'REFUSED'}"]
    lines += [f"  refused: {reason}" for reason in r["refusals"]]
    for g in r.get("globals", []):
        lines.append(f"  global {g['name']} x{g['count']}{'' if g['allowed'] else '  <- not allowed'}")
    if "tensors" in r:
        lines.append(f"  {r['tensors']} tensors, {human_bytes(r['bytes'])}, dtypes {r['dtypes']}")
    if r.get("sub_dicts"):
        lines.append("  sub-dicts: " + ", ".join(f"{k} ({v} tensors)" for k, v in r["sub_dicts"].items()))
    if r.get("shared_storages"):
        lines.append(f"  {r['shared_storages']} tensors share a storage with another")
    for name, what in list(r.get("skipped", {}).items())[:20]:
        lines.append(f"  non-tensor entry {name}: {what} (skipped)")
    emit(r, as_json, lines)
    if not r["safe"]:
        click.echo(f"sftools: error: {path}: refused: {r['refusals'][0]}", err=True)
        sys.exit(1)
