"""sftools lora extract | merge | resize | convert | check."""

from __future__ import annotations

import sys

import click

from sftools.cli.common import JSON_OPTION, OUTPUT_OPTION, emit
from sftools.io.dtypes import DTYPE_CHOICES
from sftools.lora.keys import FORMS
from sftools.lora.loaders import LOADER_NAMES
from sftools.lora.settings import RANK_MODES, SVD_METHODS, WriteAs

FORM_HELP = ("comfyui: every change; ComfyUI and Kijai's WanVideoWrapper apply all of it, LightX2V, Wan2GP, "
             "DiffSynth-Studio and diffusers part of it (sftools lora check says which keys). diffusers: peft names, "
             "without the dense diffs, that diffusers and peft load.")
FOR_HELP = ("Write, in LOADER's spelling, every change LOADER can apply, naming on stderr what it has to leave "
            "out (instead of --format).")
DTYPE_HELP = "dtype of the written tensors; keep: the input's."


@click.group("lora", short_help="Extract, merge, resize and re-format LoRAs.")
def lora_group() -> None:
    """Extract, merge, resize and re-format LoRAs for Wan 2.1 and 2.2."""


@lora_group.command("extract", short_help="Extract a LoRA from TUNED minus BASE.")
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", required=True, metavar="OUT",
              help="The LoRA file to write (OUT.safetensors); with Wan 2.2 A14B folders as BASE and TUNED, the "
                   "folder into which one LoRA per expert is written (TUNED_high_noise_lora.safetensors, ...).")
@click.option("--rank", type=int, default=32, show_default=True, help="Rank kept per module (the cap, in energy mode).")
@click.option("--rank-mode", type=click.Choice(RANK_MODES), default="fixed", show_default=True,
              help="fixed: --rank everywhere; energy: per module the smallest rank keeping --energy of ||D||_F^2.")
@click.option("--energy", type=float, default=0.99, show_default=True,
              help="Fraction of each module's squared Frobenius norm kept (energy mode), in (0, 1].")
@click.option("--format", "form", type=click.Choice(FORMS), help=FORM_HELP + " [default: comfyui]")
@click.option("--for", "loader", type=click.Choice(LOADER_NAMES), metavar="LOADER",
              help=FOR_HELP + f" LOADER: {', '.join(LOADER_NAMES)}.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="bf16", show_default=True,
              help="dtype of the factors and diffs; keep: the tuned model's.")
@click.option("--device", default="auto", show_default=True, help="Where differences and SVDs run: auto, cpu, cuda, cuda:N.")
@click.option("--svd", type=click.Choice(SVD_METHODS), default="randomized", show_default=True,
              help="randomized (torch.svd_lowrank) or exact (torch.linalg.svd, for validation; much slower).")
@click.option("--oversample", type=int, default=16, show_default=True, help="Extra columns of the randomized SVD.")
@click.option("--niter", type=int, default=4, show_default=True, help="Power iterations of the randomized SVD.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD (mixed with each tensor's name).")
@click.option("--include", metavar="REGEX", help="Only parameters whose original name matches.")
@click.option("--exclude", metavar="REGEX", help="Skip parameters whose original name matches.")
@click.option("--no-full-diffs", is_flag=True, help="Write only low-rank factors (no .diff / .diff_b).")
@click.option("--min-diff", type=float, default=0.0, show_default=True, help="Pairs whose largest |difference| is at most this count as unchanged.")
@click.option("--report", "report_path", metavar="REPORT.json",
              help="Write the whole report (per layer: rank, error, seconds) as JSON; for A14B folders one file "
                   "with both experts under \"experts\".")
@JSON_OPTION
def extract_cmd(base, tuned, output, rank, rank_mode, energy, form, loader, dtype, device, svd, oversample, niter, seed,
                include, exclude, no_full_diffs, min_diff, report_path, as_json) -> None:
    """Extract a LoRA from TUNED minus BASE (any model form, mixed layouts), one tensor pair in
    memory at a time: low-rank factors for Linear weights, dense diffs for the rest. Two Wan 2.2
    A14B folders give one LoRA per expert (high noise against high noise, low against low)."""
    write_as = _write_as(form, loader, required=False)
    from sftools.lora.extract import extract_experts_to_folder, extract_to_file
    from sftools.lora.settings import ExtractSettings, RankRule, Selection, SvdSettings
    from sftools.wan.experts import expert_pairs

    settings = ExtractSettings(
        rank=RankRule(rank=rank, mode=rank_mode, energy=energy),
        svd=SvdSettings(method=svd, oversample=oversample, niter=niter, seed=seed),
        selection=Selection(include=include, exclude=exclude, full_diffs=not no_full_diffs, min_diff=min_diff),
        device=device,
        dtype=dtype,
    )
    if expert_pairs(base, tuned):
        reports = extract_experts_to_folder(base, tuned, output, settings, write_as, report_path=report_path)
        result = {"experts": {e: r.to_dict() for e, r in reports.items()}}
    else:
        reports = {"": extract_to_file(base, tuned, output, settings, write_as, report_path=report_path)}
        result = reports[""].to_dict()
    lines = []
    for report in reports.values():
        s = report.summary
        lines.append(f"{report.output}: {s['lora_modules']} LoRA modules (rank {s['ranks']}), {s['full_diffs']} full "
                     f"diffs, {s['unchanged']} unchanged, {s['excluded']} excluded; weighted relative error "
                     f"{s['weighted_rel_error']:.4g} (max {s['max_rel_error']:.4g}); {s['seconds']:.1f} s")
        lines += _losses(report.loaders)
    emit(result, as_json, lines)
    for report in reports.values():
        _say_left_out(report.output, report.not_in_form, write_as)


@lora_group.command("merge", short_help="Bake LoRAs into a base model.")
@click.argument("base")
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:STRENGTH]...")
@OUTPUT_OPTION
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="keep", show_default=True, help="dtype of the written model; keep: the base's.")
@JSON_OPTION
def merge_cmd(base, loras, output, dtype, as_json) -> None:
    """Write BASE + STRENGTH x each LORA (any form sftools reads; STRENGTH defaults to 1.0) in
    original names, ready for ComfyUI. The base streams through one tensor at a time, in fp32."""
    from sftools.lora.merge import merge, parse_lora_arg

    r = merge(base, [parse_lora_arg(a) for a in loras], output, dtype)
    emit(r, as_json, [f"{output}: {r['patched']} of {r['tensors']} tensors patched by {len(r['loras'])} LoRA(s)"])


@lora_group.command("resize", short_help="Lower a LoRA's rank (--rank, --energy, or both).")
@click.argument("lora")
@OUTPUT_OPTION
@click.option("--rank", type=int, help="New rank; with --energy, the cap. Modules already at or below it are kept.")
@click.option("--energy", type=float, help="Keep per module the smallest rank holding this fraction of its energy, in (0, 1].")
@click.option("--format", "form", type=click.Choice(FORMS), default="comfyui", show_default=True, help=FORM_HELP)
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="keep", show_default=True, help=DTYPE_HELP)
@JSON_OPTION
def resize_cmd(lora, output, rank, energy, form, dtype, as_json) -> None:
    """Lower LORA's rank from the SVD of each module's r x r core, never forming the full matrix.
    Needs --rank, --energy, or both (the energy rule capped by the rank)."""
    from sftools.lora.resize import resize_file
    from sftools.lora.settings import RankRule

    if rank is None and energy is None:
        raise click.UsageError("give --rank, --energy, or both")
    rule = RankRule(rank=rank, mode="energy", energy=energy) if energy is not None else RankRule(rank=rank)
    layers = resize_file(lora, output, rule, form, dtype)
    resized = [layer for layer in layers if layer.rank < layer.rank_before]
    worst = max((layer.rel_error for layer in resized), default=0.0)
    line = f"{output}: {len(resized)} modules resized, {len(layers) - len(resized)} kept at their rank"
    emit({"output": output, "layers": [vars(layer) for layer in layers]}, as_json,
         [line + (f"; largest relative error {worst:.4g}" if resized else "")])


@lora_group.command("convert", short_help="Re-write a LoRA as comfyui or diffusers, or for one loader.")
@click.argument("lora")
@OUTPUT_OPTION
@click.option("--format", "form", type=click.Choice(FORMS), help=FORM_HELP)
@click.option("--for", "loader", type=click.Choice(LOADER_NAMES), metavar="LOADER",
              help=FOR_HELP + f" LOADER: {', '.join(LOADER_NAMES)}.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="keep", show_default=True, help=DTYPE_HELP)
@JSON_OPTION
def lora_convert_cmd(lora, output, form, loader, dtype, as_json) -> None:
    """Re-write LORA (comfyui, diffusers, kohya lora_unet_, LightX2V diff_m) in the comfyui or diffusers
    form (--format), or as one loader reads it (--for)."""
    write_as = _write_as(form, loader, required=True)
    from sftools.lora.forms import convert_lora

    dropped = convert_lora(lora, output, write_as.form, dtype, write_as.loader)
    emit({"output": output, "format": write_as.file_form, "for": write_as.loader, "not_in_form": dropped}, as_json,
         [f"{output}: written " + (f"for {loader}" if loader else f"in {form} form")])
    _say_left_out(output, dropped, write_as)


@lora_group.command("check", short_help="Say which keys of a LoRA each loader applies, ignores or refuses.")
@click.argument("lora")
@click.option("--loader", "names", type=click.Choice(LOADER_NAMES), multiple=True, metavar="NAME",
              help=f"A loader to check (repeatable; default: all of {', '.join(LOADER_NAMES)}).")
@JSON_OPTION
def check_cmd(lora, names, as_json) -> None:
    """Say, for each loader, how many keys of LORA it applies, which it ignores (and why), or that it
    refuses the whole file, from the file alone (an I2V LoRA is told by its img_emb/k_img/v_img keys).
    Exit 0 when every loader named applies every key, else 1."""
    from sftools.lora.check import check_file
    from sftools.lora.loaders import LOADERS

    checked = check_file(lora, dict.fromkeys(names or LOADER_NAMES))
    verdicts = checked.verdicts
    lines = [f"{lora}: checked against a Wan 2.1 {checked.kind.upper()} model"]
    for name, v in verdicts.items():
        lines.append(f"  {name:<16} {_verdict_line(v)}")
        by_reason: dict[str, list[str]] = {}
        for key, why in v.ignored.items():
            by_reason.setdefault(why, []).append(key)
        for why, keys in by_reason.items():
            lines += [f"      ignored: {why}"] + [f"        {key}" for key in keys]
    emit({"loaders": {n: v.to_dict() for n, v in verdicts.items()}}, as_json, lines)
    short = [f"{LOADERS[n].title} " + ("refuses the file" if v.refused else _verdict_line(v))
             for n, v in verdicts.items() if not v.complete]
    if short:
        click.echo(f"sftools: {lora}: " + "; ".join(short), err=True)
        sys.exit(1)


def _verdict_line(v) -> str:
    if v.refused:
        return f"refuses the file ({v.refused})"
    if v.complete:
        return f"applies all {len(v.applied)} keys"
    return f"applies {len(v.applied)} of {len(v.effects)} keys, ignores {len(v.ignored)}"


def _losses(loaders: dict[str, dict]) -> list[str]:
    """One line per loader that does not apply the whole written file."""
    out = []
    for name, r in loaders.items():
        if r["refused"]:
            out.append(f"  {name} refuses this file: {r['refused']}; --for {name} writes what it applies")
        elif r["ignored"]:
            out.append(f"  {name} ignores {len(r['ignored'])} keys (first: {r['ignored'][0]}); "
                       f"--for {name} writes what it applies")
    return out


def _say_left_out(output: str, left_out: list[str], write_as: WriteAs) -> None:
    """What the file written could not carry, on stderr, the word `modulation` included when it goes."""
    if left_out:
        what = f"{write_as.loader} cannot apply" if write_as.loader else f"the {write_as.form} form cannot carry"
        click.echo(f"sftools: {output}: {what} {len(left_out)} changes, left out: {', '.join(left_out)}", err=True)


def _write_as(form: str | None, loader: str | None, required: bool) -> WriteAs:
    if form and loader:
        raise click.UsageError("give --format or --for, not both")
    if required and not (form or loader):
        raise click.UsageError("give --format or --for")
    return WriteAs(form=form or "comfyui", loader=loader)
