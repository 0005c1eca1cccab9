"""sftools lora extract | merge | resize | convert."""

from __future__ import annotations

import json
import os
import re

import click

from sftools.cli.common import emit
from sftools.convert import DTYPES
from sftools.io.output import atomic_target, check_destination
from sftools.io.sources import open_checkpoint
from sftools.lora.extract import ExtractOptions, extract, lora_metadata
from sftools.lora.forms import FORMS, diffusers_problems, read_lora, write_lora
from sftools.lora.merge import merge, parse_lora_arg, resize
from sftools.lora.svd import METHODS, RANK_MODES

OUT_DTYPES = {k: v for k, v in DTYPES.items() if v is not None}
RANK = click.IntRange(min=1)
ENERGY = click.FloatRange(min=0, max=1, min_open=True)


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


@click.group("lora")
def lora_group() -> None:
    """Extract, merge, resize and re-format LoRAs."""


@lora_group.command("extract")
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", required=True, help="The LoRA file to write (.safetensors).")
@click.option("--rank", type=RANK, default=32, show_default=True, help="Rank (the cap, in energy mode).")
@click.option("--rank-mode", type=click.Choice(RANK_MODES), default="fixed", show_default=True)
@click.option("--energy", type=ENERGY, default=0.99, show_default=True, help="Energy fraction kept (energy mode).")
@click.option("--format", "form", type=click.Choice(FORMS), default="comfyui", show_default=True)
@click.option("--dtype", type=click.Choice(list(OUT_DTYPES)), default="bf16", show_default=True)
@click.option("--device", default="auto", show_default=True, callback=lambda ctx, param, value: _device(value),
              help="auto, cpu, cuda or cuda:N.")
@click.option("--svd", type=click.Choice(METHODS), default="randomized", show_default=True)
@click.option("--oversample", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--niter", type=click.IntRange(min=0), default=4, show_default=True, help="Power iterations (randomized SVD).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include", help="Only parameters whose original name matches this regex.")
@click.option("--exclude", help="Skip parameters whose original name matches this regex.")
@click.option("--no-full-diffs", is_flag=True, help="Write only low-rank factors (no .diff / .diff_b).")
@click.option("--min-diff", type=float, default=0.0, show_default=True, help="Pairs with max |diff| <= this are unchanged.")
@click.option("--report", "report_path", help="Write the per-layer report as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def extract_cmd(base, tuned, output, rank, rank_mode, energy, form, dtype, device, svd, oversample, niter, seed,
                include, exclude, no_full_diffs, min_diff, report_path, as_json) -> None:
    """Extract a LoRA from TUNED minus BASE, one tensor pair in memory at a time."""
    opts = ExtractOptions(rank, rank_mode, energy, svd, oversample, niter, seed, include, exclude,
                          not no_full_diffs, min_diff, device, OUT_DTYPES[dtype])
    for path in filter(None, (output, report_path)):
        check_destination(path)  # before minutes of work, not after
    if report_path and os.path.abspath(report_path) in {os.path.abspath(p) for p in (output, base, tuned)}:
        raise click.UsageError("--report must name a file other than the output and the inputs")
    lora, report = extract(base, tuned, opts)
    report["format"], report["output"] = form, output
    report["diffusers_problems"] = diffusers_problems(lora) if form == "comfyui" else []
    if report_path:
        with atomic_target(report_path) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=1)
    report["not_in_form"] = write_lora(output, lora, form, opts.dtype, lora_metadata(report))
    dropped = report["not_in_form"]
    s = report["summary"]
    lines = [f"{output}: {s['lora_modules']} LoRA modules (rank {s['ranks']}), {s['full_diffs']} full diffs, "
             f"{s['unchanged']} unchanged, {s['excluded']} excluded; weighted relative error "
             f"{s['weighted_rel_error']:.4g} (max {s['max_rel_error']:.4g}); {s['seconds']:.1f} s"]
    if dropped:
        lines.append(f"  the {form} form cannot carry {len(dropped)} dense diffs (first: {dropped[0]}); left out")
    lines += [f"  warning: diffusers will not load this file: {p}" for p in report["diffusers_problems"]]
    emit({k: v for k, v in report.items() if k != "layers"}, as_json, lines)


@lora_group.command("merge")
@click.argument("base")
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", required=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="keep", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def merge_cmd(base, loras, output, dtype, as_json) -> None:
    """Bake LORA[:STRENGTH]... into BASE (original names, ready for ComfyUI)."""
    r = merge(base, [parse_lora_arg(a) for a in loras], output, dtype)
    emit(r, as_json, [f"{output}: {r['patched']} of {r['tensors']} tensors patched by {len(r['loras'])} LoRA(s)"])


@lora_group.command("resize")
@click.argument("lora")
@click.option("-o", "--output", required=True)
@click.option("--rank", type=RANK, help="New rank (the cap, with --energy).")
@click.option("--energy", type=ENERGY, help="Keep this fraction of each module's energy.")
@click.option("--format", "form", type=click.Choice(FORMS), default="comfyui", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="keep", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def resize_cmd(lora, output, rank, energy, form, dtype, as_json) -> None:
    """Lower a LoRA's rank without forming full matrices."""
    if rank is None and energy is None:
        raise click.UsageError("give --rank or --energy")
    smaller, layers = resize(read_lora(open_checkpoint(lora)), rank, energy)
    write_lora(output, smaller, form, DTYPES[dtype] or smaller.dtype, {"sftools.resized_from": lora})
    worst = max((layer["rel_error"] for layer in layers), default=0.0)
    emit({"output": output, "layers": layers}, as_json,
         [f"{output}: {len(layers)} modules resized; largest relative error {worst:.4g}"])


@lora_group.command("convert")
@click.argument("lora")
@click.option("-o", "--output", required=True)
@click.option("--format", "form", type=click.Choice(FORMS), required=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="keep", show_default=True)
def convert_cmd(lora, output, form, dtype) -> None:
    """Re-write a LoRA (comfyui, diffusers, kohya lora_unet_, LightX2V diff_m) as comfyui or diffusers."""
    source = read_lora(open_checkpoint(lora))
    dropped = write_lora(output, source, form, DTYPES[dtype] or source.dtype, {"sftools.converted_from": lora})
    click.echo(f"{output}: written in {form} form" + (f"; left out {len(dropped)} dense diffs" if dropped else ""))
