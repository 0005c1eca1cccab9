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

Wan 2.2 A14B: the distill LoRAs are one extraction per expert (high-noise tuned minus high-noise
base, low minus low), so two A14B folders give two LoRAs, each exactly what extracting that pair
alone gives, named for its expert; a pair whose names say high against low is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch

from sftools import __version__
from sftools.devices import resolve_device
from sftools.errors import SettingsError, SftoolsError
from sftools.io.dtypes import dtype_name, torch_dtype
from sftools.io.lazy import CASTABLE, Checkpoint
from sftools.io.output import (OUTPUT_SUFFIX, check_destination, check_output_file, progress, refuse_overwrite,
                               write_text)
from sftools.io.safetensors_io import tensor_bytes
from sftools.lora.check import check_file
from sftools.lora.forms import Lora, write_lora
from sftools.lora.keys import refuse_lora
from sftools.lora.loaders import LOADER_NAMES
from sftools.lora.settings import ExtractSettings, WriteAs
from sftools.lora.svd import choose_rank, factorize
from sftools.wan.detect import describe_weights
from sftools.wan.experts import expert_pairs, refuse_crossed_experts
from sftools.wan.keys import ORIGINAL_KEY
from sftools.wan.source import load_model


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    norm: float  # ||tuned - base||_F
    kind: str  # "lora" (factors) | "diff" (dense)
    rank: int | None
    rel_error: float  # of what is written (after the cast to the output dtype), against the true difference
    optimal_rel_error: float | None  # of the optimal fp32 truncation, when an exact SVD computed it
    seconds: float


@dataclass
class ExtractReport:
    """What one extraction did: the `--report` file, the `--json` output and the LoRA's metadata
    are all this one object."""

    base: str
    tuned: str
    settings: ExtractSettings
    dtype: str  # the factors' dtype, resolved (keep -> the tuned model's)
    base_fingerprint: str = ""
    tuned_fingerprint: str = ""
    layers: list[LayerReport] = field(default_factory=list)
    unchanged: int = 0
    excluded: int = 0
    seconds: float = 0.0
    output: str | None = None
    form: str | None = None
    loader: str | None = None  # written with --for this loader
    not_in_form: list[str] = field(default_factory=list)  # parameters the form (or the loader) could not carry
    loaders: dict[str, dict] = field(default_factory=dict)  # per loader, what it does with the file written
    tool: str = f"sftools {__version__}"

    @property
    def summary(self) -> dict:
        ranks = [layer.rank for layer in self.layers if layer.kind == "lora"]
        total = sum(layer.norm**2 for layer in self.layers)
        weighted = math.sqrt(sum((layer.rel_error * layer.norm) ** 2 for layer in self.layers) / total) if total else 0.0
        return {
            "lora_modules": len(ranks),
            "full_diffs": sum(layer.kind == "diff" for layer in self.layers),
            "unchanged": self.unchanged,
            "excluded": self.excluded,
            "ranks": f"{min(ranks)}-{max(ranks)}" if ranks and min(ranks) != max(ranks) else (ranks[0] if ranks else 0),
            "weighted_rel_error": weighted,
            "max_rel_error": max((layer.rel_error for layer in self.layers), default=0.0),
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["summary"] = self.summary
        return out

    def metadata(self) -> dict[str, str]:
        """What the LoRA file records about its making (no empty entries)."""
        rule = self.settings.rank
        meta = {
            "sftools.version": __version__,
            "sftools.lora.rank": str(rule.rank),
            "sftools.lora.rank_mode": rule.mode,
            "sftools.lora.energy": str(rule.energy) if rule.mode == "energy" else "",
            "sftools.lora.svd": self.settings.svd.method,
            "sftools.lora.alpha": "rank (baked in; no .alpha keys, every loader applies scale 1)",
            "sftools.lora.base_fingerprint": self.base_fingerprint,
            "sftools.lora.tuned_fingerprint": self.tuned_fingerprint,
            "sftools.lora.weighted_rel_error": f"{self.summary['weighted_rel_error']:.6g}",
        }
        return {k: v for k, v in meta.items() if v}


def is_factored(name: str, shape: tuple[int, ...]) -> bool:
    """Linear weights: the 2-D `.weight`s (norm weights are 1-D, modulation 3-D, patch conv 5-D)."""
    return name.endswith(".weight") and len(shape) == 2


def open_pair(base_path: str, tuned_path: str) -> tuple[Checkpoint, Checkpoint]:
    """Both models in original names, checked against each other before any tensor is read."""
    refuse_crossed_experts(base_path, tuned_path)
    models, kinds = [], []
    for path in (base_path, tuned_path):
        ckpt = load_model(path, layout="original", dequant=True)
        refuse_lora(path, ckpt.tensors)
        kinds.append(describe_weights({n: t.shape for n, t in ckpt.tensors.items()}).kind)
        # Part of a model (some blocks, one shard) is fine as long as every name is a Wan one.
        stranger = next((n for n in ckpt.tensors if not ORIGINAL_KEY.match(n)), None)
        if stranger is not None:
            raise SftoolsError(f"{path}: is not a Wan 2.1 transformer ({stranger} is no Wan key); "
                               "LoRAs are extracted between models")
        models.append(ckpt)
    base, tuned = models
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


def _output_dtype(settings: ExtractSettings, tuned: Checkpoint) -> torch.dtype:
    """The factors' dtype; `keep` is the tuned model's (most of its floats; fp32 once fp8 is dequantized)."""
    chosen = torch_dtype(settings.dtype)
    if chosen is not None:
        return chosen
    floats = Counter(t.dtype for t in tuned.tensors.values() if t.dtype in CASTABLE)
    return floats.most_common(1)[0][0] if floats else torch.float32


def extract(base_path: str, tuned_path: str, settings: ExtractSettings = ExtractSettings()) -> tuple[Lora, ExtractReport]:
    """The LoRA and its report: per layer the rank kept and the relative Frobenius error of what is
    written (after the cast to the output dtype) against the true difference."""
    return extract_pair(*open_pair(base_path, tuned_path), settings)


def extract_pair(base: Checkpoint, tuned: Checkpoint, settings: ExtractSettings) -> tuple[Lora, ExtractReport]:
    device = resolve_device(settings.device)
    dtype = _output_dtype(settings, tuned)
    run = _Run(settings, device, dtype, ExtractReport(base.path, tuned.path, settings, dtype_name(dtype)))
    started = time.perf_counter()
    with progress(sum(t.nbytes for t in base.tensors.values()), "extracting") as bar:
        for name, lazy in base.tensors.items():
            run.pair(name, lazy.load(), tuned.tensors[name].load())
            bar.update(lazy.nbytes)
    if not run.report.layers:
        raise SftoolsError(f"{tuned.path}: no selected tensor differs from {base.path}; nothing to extract")
    run.report.seconds = time.perf_counter() - started
    run.report.base_fingerprint, run.report.tuned_fingerprint = (f"{fingerprint(side):08x}" for side in run.crcs)
    return run.lora, run.report


def extract_to_file(base_path: str, tuned_path: str, output: str, settings: ExtractSettings = ExtractSettings(),
                    write_as: WriteAs = WriteAs(), report_path: str | None = None) -> ExtractReport:
    """Extract and write the LoRA (and the report as JSON), refusing, before any work, destinations
    that could not be written or that are inputs."""
    _check_report_name(report_path, [output])
    base, tuned = open_pair(base_path, tuned_path)
    inputs = [base_path, tuned_path, *base.files, *tuned.files]
    check_output_file(output, inputs)
    _check_report(report_path, inputs)
    report = _extract_and_write(base, tuned, output, settings, write_as)
    if report_path:
        write_text(report_path, json.dumps(report.to_dict(), indent=1))
    return report


def expert_lora_name(tuned_path: str, expert: str) -> str:
    """`<tuned name>_<expert>_lora.safetensors`: the expert in the name, as every A14B LoRA pair carries it."""
    return f"{os.path.basename(os.path.normpath(tuned_path))}_{expert}_lora{OUTPUT_SUFFIX}"


def extract_experts_to_folder(base_path: str, tuned_path: str, folder: str, settings: ExtractSettings = ExtractSettings(),
                              write_as: WriteAs = WriteAs(), report_path: str | None = None) -> dict[str, ExtractReport]:
    """One LoRA per expert of two Wan 2.2 A14B folders, written into `folder` (created if missing) as
    `expert_lora_name`; the report, when asked, is one JSON `{"experts": {expert: report}}`. Every
    pair and destination is checked before any tensor is read."""
    pairs = expert_pairs(base_path, tuned_path)
    if pairs is None:
        raise SftoolsError(f"{base_path} and {tuned_path}: neither is a Wan 2.2 A14B folder")
    if folder.endswith(OUTPUT_SUFFIX) or (os.path.exists(folder) and not os.path.isdir(folder)):
        raise SftoolsError(f"{folder}: with Wan 2.2 A14B folders as inputs -o names a folder, "
                           "into which one LoRA per expert is written")
    outputs = {e: os.path.join(folder, expert_lora_name(tuned_path, e)) for e in pairs}
    _check_report_name(report_path, list(outputs.values()))
    opened = {e: open_pair(b, t) for e, (b, t) in pairs.items()}
    inputs = [base_path, tuned_path, *(f for pair in opened.values() for side in pair for f in side.files)]
    for root in (base_path, tuned_path):
        inside = os.path.realpath(folder) + os.sep
        if inside.startswith(os.path.realpath(root) + os.sep):
            raise SftoolsError(f"{folder}: is inside the input {root}; LoRAs written there would become part of it")
    for output in outputs.values():
        refuse_overwrite(output, inputs)
        check_destination(output if os.path.isdir(folder) else folder)
    _check_report(report_path, inputs)
    os.makedirs(folder, exist_ok=True)
    reports = {e: _extract_and_write(*opened[e], outputs[e], settings, write_as) for e in pairs}
    if report_path:
        write_text(report_path, json.dumps({"experts": {e: r.to_dict() for e, r in reports.items()}}, indent=1))
    return reports


def _check_report_name(report_path: str | None, outputs: list[str]) -> None:
    if report_path and not report_path.endswith(".json"):
        raise SettingsError(f"--report {report_path}: name a .json file (the report is JSON)")
    if report_path and any(os.path.realpath(report_path) == os.path.realpath(o) for o in outputs):
        raise SettingsError(f"--report {report_path} must name a file other than the output")


def _check_report(report_path: str | None, inputs: list[str]) -> None:
    if report_path:
        check_destination(report_path)
        refuse_overwrite(report_path, inputs)


def _extract_and_write(base: Checkpoint, tuned: Checkpoint, output: str, settings: ExtractSettings,
                       write_as: WriteAs) -> ExtractReport:
    lora, report = extract_pair(base, tuned, settings)
    report.output, report.form, report.loader = output, write_as.file_form, write_as.loader
    report.not_in_form = write_lora(output, lora, write_as.form, torch_dtype(report.dtype), report.metadata(),
                                    write_as.loader)
    report.loaders = {name: v.to_dict() for name, v in check_file(output, LOADER_NAMES).verdicts.items()}
    return report


@dataclass
class _Run:
    """What one extraction accumulates while pairs stream through it."""

    settings: ExtractSettings
    device: torch.device
    dtype: torch.dtype
    report: ExtractReport
    lora: Lora = field(default_factory=Lora)
    crcs: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))  # per side: name -> CRC of its bytes

    def pair(self, name: str, base: torch.Tensor, tuned: torch.Tensor) -> None:
        """Fingerprint one base/tuned pair, then skip, exclude or extract it."""
        for side, t in zip(self.crcs, (base, tuned)):
            side[name] = zlib.crc32(tensor_bytes(t))
        factored = is_factored(name, tuple(base.shape))
        if not self.settings.selection.selects(name, factored):
            self.report.excluded += 1
            return
        delta = tuned.to(self.device, torch.float32)
        delta.sub_(base.to(self.device))  # in place: one fp32 matrix alive per pair, not three
        del base, tuned
        largest = float(delta.abs().max()) if delta.numel() else 0.0
        if not math.isfinite(largest):
            raise SftoolsError(f"{name}: the difference holds NaN or inf (a corrupt base or tuned tensor)")
        if largest <= self.settings.selection.min_diff:
            self.report.unchanged += 1
            return
        self.report.layers.append(self._extract_one(name, delta, factored))

    def _extract_one(self, name: str, delta: torch.Tensor, factored: bool) -> LayerReport:
        started = time.perf_counter()
        norm = float(torch.linalg.vector_norm(delta))
        if not factored:
            written = delta.to(self.dtype)
            self.lora.diffs[name] = written.cpu()
            error = float(torch.linalg.vector_norm(delta - written.float())) / norm
            return LayerReport(name, list(delta.shape), norm, "diff", None, error, None, time.perf_counter() - started)
        rule = self.settings.rank
        f = factorize(delta, rule.rank, self.settings.svd, name)
        k = choose_rank(rule, f.singular_values, norm**2)
        up, down = f.up[:, :k], f.down[:k]
        # With an exact SVD the fp32 rank-k truncation is the optimal one (Eckart-Young); its residual is
        # measured directly, since summing the tail of the spectrum loses precision.
        optimal = residual_norm(delta, up, down) / norm if f.exact else None
        up, down = up.to(self.dtype), down.to(self.dtype)
        self.lora.factors[name] = (up.cpu(), down.cpu())
        error = residual_norm(delta, up.float(), down.float()) / norm
        return LayerReport(name, list(delta.shape), norm, "lora", k, error, optimal, time.perf_counter() - started)


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
