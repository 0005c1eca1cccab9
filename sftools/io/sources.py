"""One entry point for every weight source a command accepts.

A `.safetensors` file, a sharded folder or its `*.safetensors.index.json`, a diffusers model or
pipeline folder, a GGUF file (block-quantized tensors read dequantized), or a pickled checkpoint
(read by the symbolic reader, never by `torch.load`).
What a file is comes from its bytes (`formats.sniff`), not its name.
"""

from __future__ import annotations

import glob
import json
import os
import re

from sftools.errors import SftoolsError
from sftools.io.formats import sniff
from sftools.io.gguf_io import read_gguf
from sftools.io.lazy import Checkpoint
from sftools.io.safetensors_io import read_safetensors
from sftools.io.torch_pickle import read_pickle_checkpoint

SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}(?=\.safetensors$)")  # model-00001-of-00003.safetensors


def open_checkpoint(path: str) -> Checkpoint:
    """Lazy tensors from any supported source; a one-line `SftoolsError` for anything else."""
    kind = sniff(path)
    if kind == "folder":
        return _read_folder(path)
    if path.endswith(".index.json"):
        return _read_index(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "gguf":
        return read_gguf(path)
    return read_pickle_checkpoint(path)


def _read_folder(path: str) -> Checkpoint:
    transformer = os.path.join(path, "transformer")
    if os.path.isdir(transformer) and not glob.glob(os.path.join(glob.escape(path), "*.safetensors")):
        return _read_folder(transformer)
    indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors.index.json")))
    if len(indexes) == 1:
        return _read_index(indexes[0])
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise SftoolsError(f"{path}: folder holds no .safetensors files")
    if len(files) > 1 and len({SHARD_NAME.sub("", os.path.basename(f)) for f in files}) > 1:
        names = ", ".join(os.path.basename(f) for f in files[:3])
        raise SftoolsError(f"{path}: folder holds several models or files ({names}, ...); name one, or its index")
    return _merge(path, "safetensors-folder", files)


def _read_index(index_path: str) -> Checkpoint:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SftoolsError(f"{index_path}: not a safetensors index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SftoolsError(f"{index_path}: weight_map is not a map of tensor names to shard files")
    for shard in set(weight_map.values()):
        if not shard or os.path.basename(shard) != shard:
            raise SftoolsError(f"{index_path}: shard {shard!r} is not a file name beside the index")
    folder = os.path.dirname(os.path.abspath(index_path))
    files = sorted(set(weight_map.values()))
    merged = _merge(index_path, "safetensors-sharded", [os.path.join(folder, f) for f in files])
    merged.files = (index_path, *merged.files)
    missing = set(weight_map) - set(merged.tensors)
    if missing:
        raise SftoolsError(f"{index_path}: tensor {sorted(missing)[0]} is in the index but in no shard")
    return merged


def _merge(path: str, fmt: str, files: list[str]) -> Checkpoint:
    tensors = {}
    metadata: dict[str, str] = {}
    for file in files:
        if not os.path.exists(file):
            raise SftoolsError(f"{path}: shard {os.path.basename(file)} is missing")
        part = read_safetensors(file)
        for name, t in part.tensors.items():
            if name in tensors:
                raise SftoolsError(f"{path}: tensor {name} appears in two shards")
            tensors[name] = t
        metadata.update(part.metadata)
    return Checkpoint(path, fmt, tensors, metadata, files=tuple(files))
