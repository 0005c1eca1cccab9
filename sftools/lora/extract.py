"""Extracting a LoRA from a tuned (step/CFG-distilled) Wan model and its base, one pair at a time.

Both inputs are unwrapped, renamed to original Wan names and fp8-dequantized, so any mix of
layouts pairs up by name. Keys and shapes are compared before any tensor is read. Then each
base/tuned pair is read, differenced in fp32 on the chosen device, turned into factors or a dense
diff, cast to the output dtype and dropped: peak memory is one pair plus the (small) result.

2-D Linear weights become low-rank factors (U sqrt(S), sqrt(S) Vh: the scale is baked in, alpha =
rank, so every loader applies scale 1). Always factors, never a dense `.diff`, because diffusers'
Wan converter silently ignores dense diffs of Linear weights and fails on text/time embedding
biases whose weights have no factors. Everything else (biases, norms, `modulation`,
`head.modulation`, `patch_embedding`) becomes a dense diff; unchanged tensors are skipped.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch

from sftools import __version__
from sftools.convert import load_model
from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint
from sftools.io.output import progress
from sftools.io.safetensors_io import tensor_bytes
from sftools.lora.forms import Lora
from sftools.lora.svd import METHODS, RANK_MODES, choose_rank, factorize, seed_for
from sftools.wan.detect import describe
from sftools.wan.layouts import ORIGINAL_KEY


@dataclass
class ExtractOptions:
    rank: int = 32
    rank_mode: str = "fixed"
    energy: float = 0.99
    svd: str = "randomized"
    oversample: int = 16
    niter: int = 4
    seed: int = 0
    include: str | None = None  # regex on original parameter names
    exclude: str | None = None
    full_diffs: bool = True
    min_diff: float = 0.0  # a pair whose largest |difference| is at most this counts as unchanged
    device: str = "auto"
    dtype: torch.dtype = torch.bfloat16

    def check(self) -> None:
        if self.rank < 1:
            raise SftoolsError(f"--rank must be at least 1, got {self.rank}")
        if self.rank_mode not in RANK_MODES or self.svd not in METHODS:
            raise SftoolsError(f"unknown rank mode {self.rank_mode!r} or SVD method {self.svd!r}")
        if not 0 < self.energy <= 1:
            raise SftoolsError(f"--energy must be in (0, 1], got {self.energy}")
        if self.oversample < 0 or self.niter < 0:
            raise SftoolsError(f"--oversample and --niter must be >= 0, got {self.oversample} and {self.niter}")
        for pattern in (self.include, self.exclude):
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SftoolsError(f"pattern {pattern!r} is not a regular expression: {exc}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SftoolsError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SftoolsError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def is_factored(name: str, shape: tuple[int, ...]) -> bool:
    """Linear weights: the 2-D `.weight`s (norm weights are 1-D, modulation 3-D, patch conv 5-D)."""
    return name.endswith(".weight") and len(shape) == 2


def open_pair(base_path: str, tuned_path: str) -> tuple[Checkpoint, Checkpoint]:
    """Both models in original names, checked against each other before any tensor is read."""
    base = load_model(base_path, layout="original", dequant=True)
    tuned = load_model(tuned_path, layout="original", dequant=True)
    kinds = []
    for path, ckpt in ((base_path, base), (tuned_path, tuned)):
        kinds.append(describe({n: t.shape for n, t in ckpt.tensors.items()}).kind)
        # Part of a model (some blocks, one shard) is fine as long as every name is a Wan one.
        stranger = next((n for n in ckpt.tensors if not ORIGINAL_KEY.match(n)), None)
        if stranger is not None:
            raise SftoolsError(f"{path}: is not a Wan 2.1 transformer ({stranger} is no Wan key); "
                               "LoRAs are extracted between models")
    if kinds[0] != kinds[1]:
        raise SftoolsError(f"{base_path} is {kinds[0]} but {tuned_path} is {kinds[1]}: the models are of different kinds")
    for name in tuned.tensors:
        if name not in base.tensors:
            raise SftoolsError(f"{tuned_path}: has {name}, which {base_path} lacks: the models are of different kinds")
    for name, t in base.tensors.items():
        if name not in tuned.tensors:
            raise SftoolsError(f"{base_path}: has {name}, which {tuned_path} lacks: the models are of different kinds")
        if t.shape != tuned.tensors[name].shape:
            raise SftoolsError(f"{name}: base shape {list(t.shape)} but tuned shape {list(tuned.tensors[name].shape)}")
    return base, tuned


def extract(base_path: str, tuned_path: str, opts: ExtractOptions) -> tuple[Lora, dict]:
    """The LoRA and a report: per layer the rank kept and the relative Frobenius error of what is
    written (after the cast to the output dtype) against the true difference."""
    opts.check()
    run = _Run(opts, resolve_device(opts.device))
    base, tuned = open_pair(base_path, tuned_path)
    started = time.perf_counter()
    with progress(sum(t.nbytes for t in base.tensors.values()), "extracting") as bar:
        for name, lazy in base.tensors.items():
            bar.update(lazy.nbytes)
            run.pair(name, lazy.load(), tuned.tensors[name].load())
    if not run.layers:
        raise SftoolsError(f"{tuned_path}: no selected tensor differs from {base_path}; nothing to extract")
    return run.lora, _report(base_path, tuned_path, run, time.perf_counter() - started)


@dataclass
class _Run:
    """What one extraction accumulates while pairs stream through it."""

    opts: ExtractOptions
    device: torch.device
    lora: Lora = field(default_factory=Lora)
    layers: list[dict] = field(default_factory=list)
    unchanged: int = 0
    excluded: int = 0
    crcs: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))  # per side: name -> CRC of its bytes

    def pair(self, name: str, base: torch.Tensor, tuned: torch.Tensor) -> None:
        """Fingerprint one base/tuned pair, then skip, exclude or extract it."""
        for side, t in zip(self.crcs, (base, tuned)):
            side[name] = zlib.crc32(tensor_bytes(t))
        opts, factored = self.opts, is_factored(name, tuple(base.shape))
        if (opts.include and not re.search(opts.include, name)) or (opts.exclude and re.search(opts.exclude, name)) \
                or (not factored and not opts.full_diffs):
            self.excluded += 1
            return
        delta = tuned.to(self.device, torch.float32)
        delta.sub_(base.to(self.device))  # in place: one fp32 matrix alive per pair, not three
        del base, tuned
        largest = float(delta.abs().max()) if delta.numel() else 0.0
        if not math.isfinite(largest):
            raise SftoolsError(f"{name}: the difference holds NaN or inf (a corrupt base or tuned tensor)")
        if largest <= opts.min_diff:
            self.unchanged += 1
            return
        self.layers.append(_extract_one(name, delta, factored, opts, self.lora))


def _extract_one(name: str, delta: torch.Tensor, factored: bool, opts: ExtractOptions, lora: Lora) -> dict:
    started = time.perf_counter()
    norm = float(torch.linalg.vector_norm(delta))
    layer = {"name": name, "shape": list(delta.shape), "norm": norm}
    if not factored:
        written = delta.to(opts.dtype)
        lora.diffs[name] = written.cpu()
        error = float(torch.linalg.vector_norm(delta - written.float())) / norm
        return {**layer, "kind": "diff", "rank": None, "rel_error": error, "optimal_rel_error": None,
                "seconds": time.perf_counter() - started}
    f = factorize(delta, opts.rank, opts.svd, opts.oversample, opts.niter, seed_for(name, opts.seed))
    k = choose_rank(f.singular_values, norm**2, opts.rank, opts.rank_mode, opts.energy)
    up, down = f.up[:, :k], f.down[:k]
    # With an exact SVD the fp32 rank-k truncation is the optimal one (Eckart-Young); its residual is
    # measured directly, since summing the tail of the spectrum loses precision.
    optimal = residual_norm(delta, up, down) / norm if f.exact else None
    up, down = up.to(opts.dtype), down.to(opts.dtype)
    lora.factors[name] = (up.cpu(), down.cpu())
    error = residual_norm(delta, up.float(), down.float()) / norm
    return {**layer, "kind": "lora", "rank": k, "rel_error": error, "optimal_rel_error": optimal,
            "seconds": time.perf_counter() - started}


def fingerprint(crcs: dict[str, int]) -> int:
    """One CRC over (name, CRC) in name order: the same weights give the same fingerprint whatever
    their file layout or order."""
    out = 0
    for name in sorted(crcs):
        out = zlib.crc32(f"{name}:{crcs[name]:08x};".encode(), out)
    return out


def residual_norm(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||delta - up @ down||_F with a single temporary matrix."""
    return float(torch.linalg.vector_norm(torch.addmm(delta, up, down, alpha=-1)))


def _report(base_path: str, tuned_path: str, run: _Run, seconds: float) -> dict:
    layers, opts = run.layers, run.opts
    total = sum(layer["norm"] ** 2 for layer in layers)
    weighted = math.sqrt(sum((layer["rel_error"] * layer["norm"]) ** 2 for layer in layers) / total) if total else 0.0
    ranks = [layer["rank"] for layer in layers if layer["kind"] == "lora"]
    options = {k: (str(v).removeprefix("torch.") if k == "dtype" else v) for k, v in asdict(opts).items()}
    fingerprints = [fingerprint(side) for side in run.crcs]
    return {
        "tool": f"sftools {__version__}",
        "base": base_path,
        "tuned": tuned_path,
        "base_fingerprint": f"{fingerprints[0]:08x}",
        "tuned_fingerprint": f"{fingerprints[1]:08x}",
        "options": options,
        "summary": {
            "lora_modules": len(ranks),
            "full_diffs": sum(layer["kind"] == "diff" for layer in layers),
            "unchanged": run.unchanged,
            "excluded": run.excluded,
            "ranks": f"{min(ranks)}-{max(ranks)}" if ranks and min(ranks) != max(ranks) else (ranks[0] if ranks else 0),
            "weighted_rel_error": weighted,
            "max_rel_error": max((layer["rel_error"] for layer in layers), default=0.0),
            "seconds": seconds,
        },
        "layers": layers,
    }


def lora_metadata(report: dict) -> dict[str, str]:
    o = report["options"]
    return {
        "sftools.version": __version__,
        "sftools.lora.rank": str(o["rank"]),
        "sftools.lora.rank_mode": o["rank_mode"],
        "sftools.lora.energy": str(o["energy"]) if o["rank_mode"] == "energy" else "",
        "sftools.lora.svd": o["svd"],
        "sftools.lora.alpha": "rank (baked in; no .alpha keys, every loader applies scale 1)",
        "sftools.lora.base_fingerprint": report["base_fingerprint"],
        "sftools.lora.tuned_fingerprint": report["tuned_fingerprint"],
        "sftools.lora.weighted_rel_error": f"{report['summary']['weighted_rel_error']:.6g}",
    }
