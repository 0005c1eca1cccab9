"""scan, inspect, convert: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import sys

import click

from sftools.cli.common import emit, human_bytes
from sftools.convert import DTYPES, convert
from sftools.inspect import inspect_path
from sftools.io.scan import scan_file


@click.command("scan")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def scan_cmd(path: str, as_json: bool) -> None:
    """What a checkpoint holds and whether it is safe to read (exit 1 if refused)."""
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
    sys.exit(0 if r["safe"] else 1)


@click.command("inspect")
@click.argument("path")
@click.option("--select", help="Sub-dict of a training checkpoint (default generator_ema, then generator).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(path: str, select: str | None, as_json: bool) -> None:
    """Model kind, layout, tensors, parameters, dtypes; LoRA form and rank."""
    r = inspect_path(path, select)
    lines = [f"{path}: {r['title']} ({r['layout']} layout, {r['format']})",
             f"  {r['tensors']} tensors, {r['parameters']:,} parameters, dtypes {r['dtypes']}"]
    if r["kind"] == "lora":
        lines.append(f"  rank {r['rank']}, {r['lora_modules']} LoRA modules, {r['full_diffs']} full diffs")
        lines.append(f"  targets: {', '.join(r['targets'])}")
    elif "config" in r:
        c = r["config"]
        lines.append(f"  dim {c['dim']}, ffn {c['ffn_dim']}, {c['num_layers']} layers, in {c['in_dim']}, "
                     f"text {c['text_dim']}" + (f", vace layers {c['vace_layers']}" if c["vace_layers"] else ""))
        for key in ("missing", "unexpected", "mismatched"):
            if r.get(key):
                lines.append(f"  {len(r[key])} {key} keys, first: {r[key][0]}")
    lines += [f"  note: {n}" for n in r["notes"]]
    emit(r, as_json, lines)


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--select", help="Sub-dict of a training checkpoint (default generator_ema, then generator).")
@click.option("--layout", type=click.Choice(["original", "diffusers"]), default="original", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="keep", show_default=True)
@click.option("--max-shard-size", help="With a folder as DST: shard size, e.g. 5GB.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def convert_cmd(src, dst, select, layout, dtype, max_shard_size, as_json) -> None:
    """Convert a checkpoint to safetensors without executing pickle code."""
    r = convert(src, dst, select, layout, dtype, max_shard_size)
    lines = [f"{src} -> {dst}: {r['model']}, {r['tensors']} tensors, {human_bytes(r['bytes'])}, "
             f"{r['layout']} layout, dtypes {r['dtypes']}; read back and verified"]
    lines += [f"  note: {n}" for n in r["notes"]]
    emit(r, as_json, lines)
