"""`sftools convert`: any supported checkpoint to safetensors, in the original or diffusers layout."""

from __future__ import annotations

import json
import os

from sftools import __version__
from sftools.errors import SftoolsError
from sftools.io.dtypes import torch_dtype
from sftools.io.lazy import dtype_counts, shared_count
from sftools.io.output import OUTPUT_SUFFIX, check_output_file, refuse_overwrite, write_file, write_sharded
from sftools.lora.keys import refuse_lora
from sftools.wan.config import diffusers_config
from sftools.wan.detect import describe_weights
from sftools.wan.source import load_model, stored_config

DEFAULT_SHARD_BYTES = 5 * 10**9


def is_folder_destination(dst: str, layout: str, sharded: bool) -> bool:
    """A folder when DST is one, ends in a separator, or is not a .safetensors name while sharding
    or writing the diffusers layout (whose home is a model folder with its config.json)."""
    return os.path.isdir(dst) or dst.endswith(os.sep) or \
        ((sharded or layout == "diffusers") and not dst.endswith(OUTPUT_SUFFIX))


def convert_model(
    src: str,
    dst: str,
    select: str | None = None,
    layout: str = "original",
    dtype: str = "keep",
    max_shard_bytes: int | None = None,
) -> dict:
    """Convert `src` to `dst` and return a report; the output is read back and compared before it
    is renamed into place."""
    to_folder = is_folder_destination(dst, layout, max_shard_bytes is not None)
    refuse_overwrite(dst, [src], is_dir=to_folder)
    if max_shard_bytes and not to_folder:
        raise SftoolsError(f"{dst}: --max-shard-size needs a folder as the destination")
    if not to_folder:
        check_output_file(dst, [src])
    ckpt = load_model(src, select, layout)
    refuse_lora(src, ckpt.tensors)
    refuse_overwrite(dst, ckpt.files, is_dir=to_folder)
    tensors = ckpt.cast(torch_dtype(dtype)).tensors
    config = stored_config(ckpt)
    description = describe_weights({n: t.shape for n, t in ckpt.tensors.items()}, config.num_heads if config else None)
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
    if to_folder:
        extra = {}
        if layout == "diffusers" and description.kind.startswith("wan2.1"):  # not for a module alone
            extra["config.json"] = json.dumps(diffusers_config(config or description.config), indent=2)
        files = write_sharded(dst, tensors, metadata, max_shard_bytes or DEFAULT_SHARD_BYTES, extra, desc="converting")
    else:
        write_file(dst, tensors, metadata, desc="converting")
        files = [os.path.basename(dst)]
    return {
        "source": src,
        "source_format": ckpt.format,
        "destination": dst,
        "files": files,
        "layout": layout,
        "model": description.title,
        "tensors": len(tensors),
        "bytes": sum(t.nbytes for t in tensors.values()),
        "dtypes": dtype_counts(tensors.values()),
        "notes": notes,
    }
