"""Does a converted model, or a base plus an extracted LoRA, still generate what the original did?

Both are sampled with the same settings, prompt embeddings and draws; then frame by frame the PSNR
and the cosine similarity of the candidate against the reference. Without a VAE the latent frames
are compared, with peak = the reference's largest |value| over the video; with one, the decoded
pixel frames (a PSNR of 8-bit pixels with peak 255, computed on [-1, 1] with peak 2). VACE models
are both steered by one control (for example a retrained add-on against the one it started from).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sftools.io.formats import sniff
from sftools.sampling.load import plan_model
from sftools.sampling.run import PromptSource, Runtime, check_embeddings, check_vace, generate, prompt_embeddings
from sftools.sampling.settings import SampleSettings
from sftools.sampling.vace_context import ControlSource, build_context
from sftools.sampling.video import StreamingDecoder

DECODE_BLOCK = 3  # latent frames decoded at a time (12 pixel frames)


@dataclass
class VerifyReport:
    reference: str
    candidate: str
    compared: str  # "latents" | "pixels"
    psnr_db: list[float | None] = field(default_factory=list)  # None: identical frame
    cosine: list[float] = field(default_factory=list)
    min_psnr: float | None = None  # the threshold asked for
    passed: bool = True

    @property
    def worst_psnr(self) -> float:
        finite = [p for p in self.psnr_db if p is not None]
        return min(finite) if finite else math.inf

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "compared": self.compared,
                "psnr_db": self.psnr_db, "cosine": self.cosine, "worst_psnr_db": None if math.isinf(self.worst_psnr)
                else self.worst_psnr, "min_cosine": min(self.cosine), "min_psnr": self.min_psnr, "passed": self.passed}


def frame_metrics(reference: torch.Tensor, candidate: torch.Tensor, peak: float) -> tuple[list, list]:
    """Per frame (dim 0) PSNR in dB (None where identical) and cosine similarity."""
    psnr, cosine = [], []
    for ref, cand in zip(reference.double(), candidate.double()):
        mse = float(((ref - cand) ** 2).mean())
        psnr.append(None if mse == 0 else 10 * math.log10(peak**2 / mse))
        cosine.append(float(torch.nn.functional.cosine_similarity(ref.flatten(), cand.flatten(), dim=0)))
    return psnr, cosine


def _select_for(path: str, select: str | None) -> str | None:
    """--select names a sub-dict of a pickled training checkpoint; files without sub-dicts ignore it."""
    return select if select and sniff(path) in ("torch-zip", "pickle") else None


def compare_pixels(vae: str, reference: torch.Tensor, candidate: torch.Tensor, device, dtype) -> tuple[list, list]:
    """Decode both videos a block at a time and compare each pixel frame as it comes (peak 255;
    cosine of the frames centred on mid-grey, so it tells images apart): memory stays one block."""
    decoders = [StreamingDecoder(vae, device, dtype) for _ in range(2)]
    psnr, cosine = [], []
    for start in range(0, reference.shape[2], DECODE_BLOCK):
        ref, cand = (d.decode(v[:, :, start:start + DECODE_BLOCK]).double() / 127.5 - 1
                     for d, v in zip(decoders, (reference, candidate)))
        p, c = frame_metrics(ref, cand, 2.0)
        psnr += p
        cosine += c
    return psnr, cosine


def verify(reference: str, candidate: str, settings: SampleSettings, prompt: PromptSource,
           reference_loras=(), candidate_loras=(), select: str | None = None, noise_file: str | None = None,
           vae: str | None = None, min_psnr: float | None = None, runtime: Runtime = Runtime(), *,
           control: ControlSource | None = None, reference_vace: str | None = None,
           candidate_vace: str | None = None) -> VerifyReport:
    """`control` steers both models, which must then both be VACE models (or be given an add-on
    module, `reference_vace` / `candidate_vace`, grafted in memory as `sample --vace` does)."""
    sides = ((reference, reference_loras, reference_vace), (candidate, candidate_loras, candidate_vace))
    plans = [plan_model(path, list(loras), _select_for(path, select), vace) for path, loras, vace in sides]
    for (path, _, _), plan, option in zip(sides, plans, ("--reference-vace", "--candidate-vace")):
        check_vace(path, plan, control, option)
    device, dtype = runtime.resolve()
    contexts = [None, None]
    if control is not None:  # before the text encoder: a clip that does not fit costs no encoding
        built = build_context(control, settings, vae, device)
        contexts = [built.fitted(settings, plan.config.vace_in_dim) for plan in plans]
    context, negative = prompt_embeddings(prompt, device, dtype)
    for (path, _, _), plan in zip(sides, plans):
        check_embeddings(path, plan, settings, prompt, context, negative)
    runs = [generate(plan, settings, context, negative, noise_file=noise_file, device=device, dtype=dtype,
                     control=vace_context) for plan, vace_context in zip(plans, contexts)]
    if vae:
        psnr, cosine = compare_pixels(vae, *runs, device, dtype)
        compared = "pixels"
    else:
        ref, cand = (latents[0].transpose(0, 1) for latents in runs)  # [frames, C, h, w]
        psnr, cosine = frame_metrics(ref, cand, float(ref.abs().max()) or 1.0)
        compared = "latents"
    report = VerifyReport(reference, candidate, compared, psnr, cosine, min_psnr)
    report.passed = min_psnr is None or report.worst_psnr >= min_psnr
    return report
