"""sftools inspect (the module is not called `inspect`, which would shadow the standard library's
for scripts run from this folder)."""

from __future__ import annotations

import click

from sftools.cli.common import JSON_OPTION, emit

SELECT_HELP = "Sub-dict of a training checkpoint (default generator_ema, then generator); a/b for deeper ones."


@click.command("inspect", short_help="Model kind, layout, tensors, dtypes; LoRA form and rank.")
@click.argument("path")
@click.option("--select", metavar="NAME", help=SELECT_HELP)
@JSON_OPTION
def inspect_cmd(path: str, select: str | None, as_json: bool) -> None:
    """Name what PATH is (Wan 2.1 t2v / i2v / flf2v / VACE model and its size, Wan 2.2 TI2V-5B or
    A14B and its experts, VACE module, LoRA form and rank) and in which layout, with its tensors,
    parameters, dtypes and the metadata sftools wrote."""
    from sftools.inspection import inspect_file

    r = inspect_file(path, select)
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
    lines += [f"  {e}: {p['path']}: {p['title']}, {p['tensors']} tensors, {p['layout']} layout"
              for e, p in r.get("experts", {}).items()]
    lines += [f"  {k}: {v}" for k, v in r["sftools_metadata"].items()]
    lines += [f"  note: {n}" for n in r["notes"]]
    emit(r, as_json, lines)
