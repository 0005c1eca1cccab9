"""sftools convert."""

from __future__ import annotations

import click

from sftools.cli.common import JSON_OPTION, SizeType, emit
from sftools.cli.inspect_cmd import SELECT_HELP
from sftools.io.dtypes import DTYPE_CHOICES
from sftools.io.units import human_bytes
from sftools.wan.keys import LAYOUTS


@click.command("convert", short_help="Convert a checkpoint to safetensors, never running pickle code.")
@click.argument("src")
@click.argument("dst")
@click.option("--select", metavar="NAME", help=SELECT_HELP)
@click.option("--layout", type=click.Choice(LAYOUTS), default="original", show_default=True,
              help="original: the Wan names ComfyUI and Kijai's wrapper load; diffusers: WanTransformer3DModel names "
                   "(a folder DST gets its config.json).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="keep", show_default=True,
              help="Cast floats of 16 bits or more; integers and fp8 stay as they are.")
@click.option("--max-shard-size", type=SizeType(), help="Write DST as a folder of shards of at most this size (5GB, 500MB).")
@JSON_OPTION
def convert_cmd(src, dst, select, layout, dtype, max_shard_size, as_json) -> None:
    """Convert SRC (a .pt/.pth/.ckpt/.bin pickle, read without executing it, a safetensors file,
    a sharded or diffusers folder) to safetensors at DST: a .safetensors file, or a folder (an
    existing one, a name ending in /, or any other name with --max-shard-size or --layout diffusers).
    A Wan 2.2 A14B folder converts both experts into DST/high_noise_model/ and DST/low_noise_model/
    (original) or DST/transformer/ and DST/transformer_2/ (diffusers). The output is read back and
    compared before it is renamed into place."""
    from sftools.convert import convert_model

    r = convert_model(src, dst, select, layout, dtype, max_shard_size)
    lines = [f"{src} -> {dst}: {r['model']}, {r['tensors']} tensors, {human_bytes(r['bytes'])}, "
             f"{r['layout']} layout, dtypes {r['dtypes']}; read back and verified"]
    lines += [f"  {e}: -> {x['destination']}: {x['model']}, {x['tensors']} tensors" for e, x in r.get("experts", {}).items()]
    lines += [f"  note: {n}" for n in r["notes"]]
    emit(r, as_json, lines)
