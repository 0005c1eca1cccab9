"""sftools convert."""

from __future__ import annotations

import click

from sftools.cli.common import JSON_OPTION, SizeType, emit
from sftools.cli.inspect_cmd import SELECT_HELP
from sftools.io.dtypes import CONVERT_DTYPE_CHOICES, QUANT_CHOICES, quant_name
from sftools.io.units import human_bytes
from sftools.wan.keys import LAYOUTS


class QuantType(click.ParamType):
    """A GGUF type convert writes (any case); a K-quant is refused saying why, as a usage error."""

    name = "|".join(QUANT_CHOICES)

    def convert(self, value, param, ctx) -> str:
        try:
            return quant_name(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command("convert", short_help="Convert a checkpoint to safetensors (or scaled fp8, or GGUF), never running pickle code.")
@click.argument("src")
@click.argument("dst")
@click.option("--select", metavar="NAME", help=SELECT_HELP)
@click.option("--layout", type=click.Choice(LAYOUTS), default="original", show_default=True,
              help="original: the Wan names ComfyUI and Kijai's wrapper load; diffusers: WanTransformer3DModel names "
                   "(a folder DST gets its config.json).")
@click.option("--dtype", type=click.Choice(CONVERT_DTYPE_CHOICES), default="keep", show_default=True,
              help="Cast floats of 16 bits or more; integers and fp8 stay as they are. fp8_e4m3fn_scaled: ComfyUI's "
                   "scaled fp8 (every Linear weight as fp8 with a float32 scale_weight, the rest bit for bit).")
@click.option("--quant", type=QuantType(), help="Write DST.gguf for ComfyUI-GGUF: the block Linears in this type, "
              "tensors that are not 2-D in F32, the other 2-D ones in the source's (or --dtype's) float type.")
@click.option("--max-shard-size", type=SizeType(), help="Write DST as a folder of shards of at most this size (5GB, 500MB).")
@JSON_OPTION
def convert_cmd(src, dst, select, layout, dtype, quant, max_shard_size, as_json) -> None:
    """Convert SRC (a .pt/.pth/.ckpt/.bin pickle, read without executing it, a safetensors file,
    a sharded or diffusers folder, a GGUF file) to safetensors at DST: a .safetensors file, or a
    folder (an existing one, a name ending in /, or any other name with --max-shard-size or
    --layout diffusers). A Wan 2.2 A14B folder converts both experts into DST/high_noise_model/ and
    DST/low_noise_model/ (original) or DST/transformer/ and DST/transformer_2/ (diffusers).
    --dtype fp8_e4m3fn_scaled and --quant (DST.gguf) write one Wan model in the quantized forms
    ComfyUI loads, each quantized tensor checked against its type's error bound. The output is
    read back and compared before it is renamed into place."""
    from sftools.convert import convert_model

    r = convert_model(src, dst, select, layout, dtype, max_shard_size, quant)
    lines = [f"{src} -> {dst}: {r['model']}, {r['tensors']} tensors, {human_bytes(r['bytes'])}, "
             f"{r.get('quant', r['layout'] + ' layout')}, dtypes {r['dtypes']}; read back and verified"]
    lines += [f"  {e}: -> {x['destination']}: {x['model']}, {x['tensors']} tensors" for e, x in r.get("experts", {}).items()]
    lines += [f"  note: {n}" for n in r["notes"]]
    emit(r, as_json, lines)
