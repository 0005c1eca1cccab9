"""Writing outputs atomically: one safetensors file, or shards plus an index, then verifying them.

Everything is written under a temporary name beside the destination and renamed only after the
written bytes were read back by safetensors and matched; a crash or refusal leaves no partial
output under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Iterator

from tqdm import tqdm

from sftools.errors import SftoolsError
from sftools.io.safetensors_io import PlannedTensor, plan_order, verify_safetensors, write_safetensors

SHARD_STEM = "diffusion_pytorch_model"  # the name diffusers and the Wan-AI repositories use
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, like diffusers' max_shard_size; KiB/MiB/GiB binary)."""
    s = text.strip().upper()
    digits = s.rstrip("KMGTIB")
    unit = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        value = -1
    if unit not in UNITS or not 0 < value < 1e18:  # also refuses nan and inf
        raise SftoolsError(f"size {text!r} is not a size like 5GB or 500MB")
    return int(value * UNITS[unit])


def progress(total: int, desc: str, unit: str = "B") -> tqdm:
    """A bar on a terminal, silence otherwise."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not sys.stderr.isatty(), leave=False)


def check_destination(dst: str) -> None:
    """Refuse, before any work, a destination file that could not be written."""
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    if not os.path.isdir(parent):
        raise SftoolsError(f"{dst}: folder {parent} does not exist")
    if os.path.isdir(dst):
        raise SftoolsError(f"{dst}: is a folder; give a file name")
    if not os.access(parent, os.W_OK):
        raise SftoolsError(f"{dst}: folder {parent} is not writable")


@contextlib.contextmanager
def atomic_target(dst: str, is_dir: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `dst`; move it to `dst` only if the block succeeds."""
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    if is_dir:
        _check_folder_destination(dst, parent)
    else:
        check_destination(dst)
    base = os.path.basename(os.path.normpath(dst))
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent) if is_dir else \
        os.path.join(parent, f".{base}.{os.getpid()}.tmp")
    if is_dir:  # mkdtemp makes 0700; an output folder gets the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if is_dir:
            _replace_dir(tmp, dst)
        else:
            os.replace(tmp, dst)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def _check_folder_destination(dst: str, parent: str) -> None:
    """An output folder may be new, or one holding only files sftools writes there."""
    if not os.path.isdir(parent):
        raise SftoolsError(f"{dst}: folder {parent} does not exist")
    if not os.path.exists(dst):
        return
    if not os.path.isdir(dst):
        raise SftoolsError(f"{dst}: exists and is not a folder")
    foreign = [n for n in os.listdir(dst) if not (n.startswith(SHARD_STEM) or n == "config.json")]
    if foreign:
        raise SftoolsError(f"{dst}: folder holds other files ({foreign[0]}, ...); choose an empty or new folder")


def _replace_dir(tmp: str, dst: str) -> None:
    """Move the finished folder into place; an existing one is swapped out whole, never mixed
    file by file with the new output."""
    if not os.path.exists(dst):
        os.rename(tmp, dst)
        return
    old = tmp + ".old"
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_file(dst: str, tensors: list[PlannedTensor], metadata: dict[str, str], desc: str = "writing") -> None:
    """One safetensors file, written atomically and verified."""
    ordered = plan_order(tensors)
    with atomic_target(dst) as tmp, progress(sum(t.nbytes for t in ordered), desc) as bar:
        crcs = write_safetensors(tmp, ordered, metadata, on_tensor=lambda t: bar.update(t.nbytes))
        verify_safetensors(tmp, crcs)


def write_sharded(
    dst_dir: str,
    tensors: list[PlannedTensor],
    metadata: dict[str, str],
    max_shard_bytes: int,
    extra_files: dict[str, str] | None = None,
    desc: str = "writing",
) -> list[str]:
    """Shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its own) plus the
    `diffusion_pytorch_model.safetensors.index.json` diffusers reads; one shard gets no index."""
    shards = _split(plan_order(tensors), max_shard_bytes)
    n = len(shards)
    names = [f"{SHARD_STEM}.safetensors"] if n == 1 else [
        f"{SHARD_STEM}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
    ]
    total = sum(t.nbytes for t in tensors)
    with atomic_target(dst_dir, is_dir=True) as tmp, progress(total, desc) as bar:
        for name, shard in zip(names, shards):
            path = os.path.join(tmp, name)
            crcs = write_safetensors(path, shard, metadata, on_tensor=lambda t: bar.update(t.nbytes))
            verify_safetensors(path, crcs)
        if n > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
            }
            with open(os.path.join(tmp, f"{SHARD_STEM}.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        for fname, text in (extra_files or {}).items():
            with open(os.path.join(tmp, fname), "w") as f:
                f.write(text)
    return names


def _split(tensors: list[PlannedTensor], limit: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards
