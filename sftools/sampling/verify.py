"""Does a converted model, or a base plus an extracted LoRA, still generate what the original did?

Both are sampled with the same settings, prompt embeddings and draws; then frame by frame the PSNR
and the cosine similarity of the candidate against the reference. Without a VAE the latent frames
are compared, with peak = the reference's largest |value| over the video; with one, the decoded
pixel frames, with peak 255.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sftools.sampling.run import PromptSource, Runtime, generate, prompt_embeddings
from sftools.sampling.settings import SampleSettings
from sftools.sampling.video import StreamingDecoder


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


def decode_all(vae: str, latents: torch.Tensor, device, dtype) -> torch.Tensor:
    decoder = StreamingDecoder(vae, device, dtype)
    return torch.cat([decoder.decode(latents[:, :, i:i + 3]) for i in range(0, latents.shape[2], 3)])


def verify(reference: str, candidate: str, settings: SampleSettings, prompt: PromptSource,
           reference_loras=(), candidate_loras=(), select: str | None = None, noise_file: str | None = None,
           vae: str | None = None, min_psnr: float | None = None, runtime: Runtime = Runtime()) -> VerifyReport:
    device, dtype = runtime.resolve()
    context, negative = prompt_embeddings(prompt, device, dtype)
    runs = [generate(path, settings, context, negative, loras, select, noise_file, device, dtype)
            for path, loras in ((reference, reference_loras), (candidate, candidate_loras))]
    if vae:
        ref, cand = (decode_all(vae, latents, device, dtype).float() for latents in runs)
        psnr, cosine = frame_metrics(ref, cand, 255.0)
        compared = "pixels"
    else:
        ref, cand = (latents[0].transpose(0, 1) for latents in runs)  # [frames, C, h, w]
        psnr, cosine = frame_metrics(ref, cand, float(ref.abs().max()) or 1.0)
        compared = "latents"
    report = VerifyReport(reference, candidate, compared, psnr, cosine, min_psnr)
    report.passed = min_psnr is None or report.worst_psnr >= min_psnr
    return report
