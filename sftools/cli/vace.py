"""sftools vace extract | graft."""

from __future__ import annotations

import click

from sftools.cli.common import JSON_OPTION, emit
from sftools.cli.inspect_cmd import SELECT_HELP
from sftools.io.dtypes import DTYPE_CHOICES
from sftools.io.units import human_bytes
from sftools.wan.keys import LAYOUTS


@click.group("vace", short_help="Extract a VACE add-on from a VACE model, or graft one onto a T2V base.")
def vace_group() -> None:
    """Cut the VACE add-on (vace_patch_embedding.*, vace_blocks.*) out of a Wan2.1-VACE model, or
    graft one onto another T2V model of its size, such as a Self Forcing model."""


@vace_group.command("extract", short_help="Write the VACE add-on of a VACE model alone (a module file).")
@click.argument("vace_model")
@click.option("-o", "--output", required=True, metavar="MODULE.safetensors",
              help="The module file to write (written under a temporary name, renamed when verified).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="original", show_default=True,
              help="original: the names Kijai's WanVideoWrapper merges into a base; diffusers: "
                   "WanVACETransformer3DModel names. graft takes either.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="keep", show_default=True,
              help="Cast floats of 16 bits or more; keep: the source's dtypes.")
@click.option("--select", metavar="NAME", help=SELECT_HELP)
@JSON_OPTION
def extract_cmd(vace_model, output, layout, dtype, select, as_json) -> None:
    """Write only the vace_* tensors of VACE_MODEL (a .safetensors file, a Wan-AI or diffusers folder,
    a pickle read without executing it, or a module) to a module file, with the placement of its
    blocks in the metadata so graft can check it. Scaled fp8 is dequantized; other dtypes are kept."""
    from sftools.wan.vace import extract_module

    r = extract_module(vace_model, output, layout, dtype, select)
    lines = [f"{vace_model} -> {output}: VACE add-on of {r['source_model']}, {r['tensors']} tensors, "
             f"{human_bytes(r['bytes'])}, {layout} layout, dtypes {r['dtypes']}; read back and verified",
             _placement_line(r)]
    lines += [f"  note: {n}" for n in r["notes"]]
    emit(r, as_json, lines)


@vace_group.command("graft", short_help="Write BASE plus a VACE add-on as one VACE model.")
@click.argument("base")
@click.argument("module")
@click.option("-o", "--output", required=True, metavar="OUT.safetensors",
              help="The model to write, in original names (written under a temporary name, renamed when verified).")
@click.option("--select", metavar="NAME",
              help="Sub-dict of BASE when it is a training checkpoint (default generator_ema, then generator); "
                   "a/b for deeper ones.")
@click.option("--replace", "replace_addon", is_flag=True,
              help="BASE already holds a VACE add-on: drop it and graft MODULE's instead (refused without this).")
@JSON_OPTION
def graft_cmd(base, module, output, select, replace_addon, as_json) -> None:
    """Write BASE (a T2V model in any form, e.g. a Self Forcing .pt) with the add-on of MODULE (a module
    file in either layout, or a whole VACE model) as one model that ComfyUI, diffusers and sftools
    inspect load as VACE: BASE's tensors bit for bit, then the add-on's. Refused, writing nothing,
    when the add-on does not fit: another width or ffn size, an I2V base, more blocks than BASE has
    layers, or a placement ComfyUI would not reproduce."""
    from sftools.wan.vace import graft_module

    r = graft_module(base, module, output, select, replace_addon)
    lines = [f"{base} + {module} -> {output}: {r['model']}, {r['base_tensors']} base + {r['vace_tensors']} VACE "
             f"tensors, dtypes {r['dtypes']}; read back and verified", _placement_line(r)]
    lines += [f"  note: {n}" for n in r["notes"]]
    emit(r, as_json, lines)


def _placement_line(r: dict) -> str:
    return (f"  {r['vace_blocks']} VACE blocks after layers {r['vace_layers']} of a {r['cut_from_layers']}-layer "
            f"model, dim {r['dim']} ({r['placement']})")
