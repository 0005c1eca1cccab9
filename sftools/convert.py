"""`sftools convert`: any supported checkpoint to safetensors, in the original or diffusers layout,
or to the quantized forms ComfyUI users load (scaled fp8 safetensors, GGUF).

A Wan 2.2 A14B folder (two experts) converts whole: each expert into the sub-folder its output
layout gives it (`high_noise_model/` + `low_noise_model/`, or diffusers' `transformer/` +
`transformer_2/`), each with its config.json, and the whole output folder is renamed into place
only when both experts were written and read back.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

from sftools import __version__
from sftools.errors import SettingsError, SftoolsError
from sftools.io.dtypes import FP8_SCALED, KEEP, QUANT_CHOICES, quant_name, torch_dtype
from sftools.io.gguf_io import GGUF_SUFFIX, write_gguf
from sftools.io.lazy import Checkpoint, LazyTensor, dtype_counts, shared_count
from sftools.io.output import (OUTPUT_SUFFIX, atomic_target, check_output_file, refuse_overwrite, write_file,
                               write_ordered, write_sharded)
from sftools.lora.keys import refuse_lora
from sftools.wan.config import diffusers_config, wan_config
from sftools.wan.detect import Description, describe_experts
from sftools.wan.experts import EXPERT_FOLDERS, expert_folders
from sftools.wan.fp8 import scaled_fp8_tensors
from sftools.wan.gguf_form import ARCH, file_type, gguf_tensors
from sftools.wan.source import describe, load_model, stored_config

DEFAULT_SHARD_BYTES = 5 * 10**9


def is_folder_destination(dst: str, layout: str, sharded: bool) -> bool:
    """A folder when DST is one, ends in a separator, or is not a .safetensors name while sharding
    or writing the diffusers layout (whose home is a model folder with its config.json)."""
    return os.path.isdir(dst) or dst.endswith(os.sep) or \
        ((sharded or layout == "diffusers") and not dst.endswith(OUTPUT_SUFFIX))


@dataclass
class _Source:
    """One opened model, ready to write: its renamed, cast tensors and what is known about it."""

    path: str
    ckpt: Checkpoint
    tensors: dict[str, LazyTensor]
    description: Description
    metadata: dict[str, str]
    notes: list[str]

    def report(self, dst: str, files: list[str], layout: str) -> dict:
        return {
            "source": self.path,
            "source_format": self.ckpt.format,
            "destination": dst,
            "files": files,
            "layout": layout,
            "model": self.description.title,
            "tensors": len(self.tensors),
            "bytes": sum(t.nbytes for t in self.tensors.values()),
            "dtypes": dtype_counts(self.tensors.values()),
            "notes": self.notes,
        }


def _open(src: str, select: str | None, layout: str, dtype: str, expert: str | None = None,
          dequant: bool = False) -> _Source:
    ckpt = load_model(src, select, layout, dequant)
    refuse_lora(src, ckpt.tensors)
    metadata = {
        **{k: v for k, v in ckpt.metadata.items() if k.startswith("sftools.")},
        "format": "pt",
        "sftools.version": __version__,
        "sftools.source": os.path.basename(os.path.normpath(src)),
        "sftools.source_format": ckpt.format,
        "sftools.layout": layout,
    }
    # Pickled storages can be shared by several tensors; safetensors tensors never are.
    shared = shared_count(t.storage[0] for t in ckpt.tensors.values()) if ckpt.format.startswith("torch") else 0
    notes = list(ckpt.notes)
    if shared:
        notes.append(f"{shared} tensors share storage with another (views or tied weights); each is written with its own bytes")
    return _Source(src, ckpt, ckpt.cast(torch_dtype(dtype)).tensors, describe(ckpt, expert), metadata, notes)


def _write_folder(dst: str, source: _Source, layout: str, max_shard_bytes: int | None, expert: bool = False) -> list[str]:
    """Shards plus the config.json that lets the folder load: diffusers' for the diffusers layout,
    and Wan-AI's `WanModel` one for an A14B expert in original names (Wan2.2 loads it that way)."""
    config = stored_config(source.ckpt) or source.description.config
    extra = {}
    if source.description.is_model and layout == "diffusers":  # not for a VACE module alone
        extra["config.json"] = json.dumps(diffusers_config(config), indent=2)
    elif expert:
        extra["config.json"] = json.dumps(wan_config(config), indent=2)
    return write_sharded(dst, source.tensors, source.metadata, max_shard_bytes or DEFAULT_SHARD_BYTES, extra,
                         desc="converting")


def convert_model(
    src: str,
    dst: str,
    select: str | None = None,
    layout: str = "original",
    dtype: str = "keep",
    max_shard_bytes: int | None = None,
    quant: str | None = None,
) -> dict:
    """Convert `src` to `dst` and return a report; the output is read back and compared before it
    is renamed into place. `dtype` fp8_e4m3fn_scaled, `quant` or a .gguf `dst` ask for a quantized form."""
    if quant or dtype == FP8_SCALED or dst.endswith(GGUF_SUFFIX):
        return convert_quantized(src, dst, select, layout, dtype, max_shard_bytes, quant)
    experts = expert_folders(src)
    if experts:
        return convert_experts(src, experts, dst, select, layout, dtype, max_shard_bytes)
    to_folder = is_folder_destination(dst, layout, max_shard_bytes is not None)
    refuse_overwrite(dst, [src], is_dir=to_folder)
    if max_shard_bytes and not to_folder:
        raise SftoolsError(f"{dst}: --max-shard-size needs a folder as the destination")
    if not to_folder:
        check_output_file(dst, [src])
    source = _open(src, select, layout, dtype)
    refuse_overwrite(dst, source.ckpt.files, is_dir=to_folder)
    if to_folder:
        files = _write_folder(dst, source, layout, max_shard_bytes)
    else:
        write_file(dst, source.tensors, source.metadata, desc="converting")
        files = [os.path.basename(dst)]
    return source.report(dst, files, layout)


def convert_experts(src: str, experts: dict[str, str], dst: str, select: str | None, layout: str, dtype: str,
                    max_shard_bytes: int | None) -> dict:
    """Both experts of the A14B folder `src` into `dst`, one sub-folder each (named for `layout`)."""
    if dst.endswith(OUTPUT_SUFFIX):
        raise SftoolsError(f"{dst}: {src} holds two Wan 2.2 A14B experts; give a folder as DST (one sub-folder per expert)")
    refuse_overwrite(dst, [src], is_dir=True)
    sources = {e: _open(path, select, layout, dtype, expert=e) for e, path in experts.items()}
    model = describe_experts(src, {e: s.description for e, s in sources.items()})
    refuse_overwrite(dst, [f for s in sources.values() for f in s.ckpt.files], is_dir=True)
    folders = EXPERT_FOLDERS[layout]
    reports = {}
    with atomic_target(dst, is_dir=True, own_names=folders.values()) as tmp:
        for expert, source in sources.items():
            files = _write_folder(os.path.join(tmp, folders[expert]), source, layout, max_shard_bytes, expert=True)
            reports[expert] = source.report(os.path.join(dst, folders[expert]), files, layout)
    return {
        "source": src,
        "destination": dst,
        "files": [f"{folders[e]}/{f}" for e, r in reports.items() for f in r["files"]],
        "layout": layout,
        "model": f"{model.title} (experts: {', '.join(reports)})",
        "task": model.details["task"],
        "experts": reports,
        "tensors": sum(r["tensors"] for r in reports.values()),
        "bytes": sum(r["bytes"] for r in reports.values()),
        "dtypes": dtype_counts(t for s in sources.values() for t in s.tensors.values()),
        "notes": [f"{e}: {n}" for e, r in reports.items() for n in r["notes"]],
    }


def convert_quantized(src: str, dst: str, select: str | None, layout: str, dtype: str, max_shard_bytes: int | None,
                      quant: str | None) -> dict:
    """`src` as one file in ComfyUI's scaled fp8 (`quant` None) or as a GGUF of type `quant` (the
    other tensors cast by `dtype` first): fp8 sources are dequantized, every quantized tensor is
    checked against its type's error bound, and the file is read back before it is renamed."""
    quant = _quantized_form(dst, layout, dtype, max_shard_bytes, quant)
    experts = expert_folders(src)
    if experts:
        raise SftoolsError(f"{src}: holds two Wan 2.2 A14B experts; quantize each into its own file "
                           f"({', '.join(experts.values())})")
    check_output_file(dst, [src], GGUF_SUFFIX if quant else OUTPUT_SUFFIX)
    source = _open(src, select, layout, dtype if quant else KEEP, dequant=True)
    if source.description.kind == "unknown":
        raise SftoolsError(f"{src}: is not a Wan model (first key {next(iter(source.tensors))}); "
                           f"quantized forms are written for Wan transformers and VACE modules")
    refuse_overwrite(dst, source.ckpt.files)
    written = _write_gguf(dst, source, quant) if quant else _write_scaled_fp8(dst, source)
    return {**source.report(dst, [os.path.basename(dst)], layout), **written, "quant": quant or FP8_SCALED}


def _write_gguf(dst: str, source: _Source, quant: str) -> dict:
    tensors = gguf_tensors(source.tensors, quant)
    metadata = {k: v for k, v in source.metadata.items() if k.startswith("sftools.")}
    write_gguf(dst, tensors, ARCH, file_type(quant), metadata, desc="quantizing")
    return {"tensors": len(tensors), "dtypes": dict(Counter(t.qtype.name for t in tensors)),
            "bytes": sum(t.nbytes for t in tensors)}


def _write_scaled_fp8(dst: str, source: _Source) -> dict:
    ordered = scaled_fp8_tensors(source.tensors)
    write_ordered(dst, ordered, source.metadata, desc="quantizing")
    return {"tensors": len(ordered), "dtypes": dtype_counts(t for _, t in ordered),
            "bytes": sum(t.nbytes for _, t in ordered)}


def _quantized_form(dst: str, layout: str, dtype: str, max_shard_bytes: int | None, quant: str | None) -> str | None:
    """The GGUF type asked for (None: scaled fp8), once options that do not combine are refused."""
    try:
        quant = quant_name(quant) if quant is not None else None
    except ValueError as exc:
        raise SettingsError(f"--quant {exc}") from None
    gguf_dst = dst.endswith(GGUF_SUFFIX)
    conflicts = [
        (quant and dtype == FP8_SCALED, "--quant and --dtype fp8_e4m3fn_scaled ask for two output forms; give one"),
        (quant is None and gguf_dst, f"{dst}: a GGUF output needs --quant {'|'.join(QUANT_CHOICES)}"),
        (quant and not gguf_dst, f"{dst}: --quant writes GGUF; give a name ending in {GGUF_SUFFIX}"),
        (max_shard_bytes, "quantized outputs are one file; drop --max-shard-size"),
        (layout != "original", "quantized outputs keep the original Wan names ComfyUI loads; drop --layout diffusers"),
    ]
    for conflict, message in conflicts:
        if conflict:
            raise SettingsError(message)
    return quant
