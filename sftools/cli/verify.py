"""sftools verify."""

from __future__ import annotations

import sys

import click

from sftools.cli.common import JSON_OPTION, emit
from sftools.cli.sample import build, control_options, control_source, lora_args, sampling_options


@click.command("verify", short_help="Compare two models' samples on identical noise.")
@click.argument("reference")
@click.argument("candidate")
@click.option("--reference-lora", "reference_loras", multiple=True, metavar="LORA[:S]", help="LoRA merged into REFERENCE (repeatable).")
@click.option("--candidate-lora", "candidate_loras", multiple=True, metavar="LORA[:S]", help="LoRA merged into CANDIDATE (repeatable).")
@click.option("--reference-vace", metavar="MODULE", help="A VACE add-on module grafted onto REFERENCE in memory.")
@click.option("--candidate-vace", metavar="MODULE", help="A VACE add-on module grafted onto CANDIDATE in memory.")
@click.option("--min-psnr", type=float, metavar="DB", help="Exit 1 when a frame's PSNR is below this.")
@control_options
@sampling_options
@JSON_OPTION
def verify_cmd(reference, candidate, reference_loras, candidate_loras, reference_vace, candidate_vace, min_psnr,
               as_json, **kw) -> None:
    """Sample REFERENCE and CANDIDATE (for example a distilled model, and its base with
    --candidate-lora the LoRA extracted from it) with the same prompt and draws, and report per
    frame the PSNR and cosine similarity: of latents, or of pixels with --vae. VACE models (or
    models given an add-on with --reference-vace / --candidate-vace) both follow --control."""
    from sftools.sampling.verify import verify

    control = control_source(kw)
    settings, prompt, runtime = build(kw)
    r = verify(reference, candidate, settings, prompt, lora_args(reference_loras), lora_args(candidate_loras),
               kw["select"], kw["noise_file"], kw["vae"], min_psnr, runtime, control=control,
               reference_vace=reference_vace, candidate_vace=candidate_vace)
    fmt = lambda p: "identical" if p is None else f"{p:.2f} dB"  # noqa: E731
    lines = [f"{r.compared}, frame by frame (PSNR, cosine):"]
    lines += [f"  frame {i}: {fmt(p)}, {c:.6f}" for i, (p, c) in enumerate(zip(r.psnr_db, r.cosine))]
    worst = "identical" if r.worst_psnr == float("inf") else f"{r.worst_psnr:.2f} dB"
    lines.append(f"worst {worst}, min cosine {min(r.cosine):.6f}" + (
        f"; {'PASS' if r.passed else 'FAIL'} against --min-psnr {min_psnr}" if min_psnr is not None else ""))
    emit(r.to_dict(), as_json, lines)
    if not r.passed:
        click.echo(f"sftools: error: {candidate}: worst frame {worst} is below --min-psnr {min_psnr}", err=True)
        sys.exit(1)
