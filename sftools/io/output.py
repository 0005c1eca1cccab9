"""Writing outputs safely: never over an input, never half-written, always read back.

Everything is written under a temporary name beside the destination and renamed only after the
written bytes were read back by safetensors and matched; a crash or refusal leaves no partial
output under the final name. Temporary names are short (`.sftools-<hash of the name>-<hash of the
host>-<pid>.tmp`), so any name the OS accepts can be written, and carry the writer's host and pid, so
a later run on that host to the same destination removes what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import sys
import zlib
from typing import Iterable, Iterator, Mapping

from tqdm import tqdm

from sftools.errors import SftoolsError
from sftools.io.lazy import LazyTensor
from sftools.io.safetensors_io import Named, plan_order, verify_safetensors, write_safetensors

log = logging.getLogger("sftools")
SHARD_STEM = "diffusion_pytorch_model"  # the name diffusers and the Wan-AI repositories use
OUTPUT_SUFFIX = ".safetensors"


def progress(total: int, desc: str, unit: str = "B") -> tqdm:
    """A bar on a terminal (done, rate, ETA), silence otherwise."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=not sys.stderr.isatty(),
                leave=False, dynamic_ncols=True)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _spellings(path: str) -> set[str]:
    """The absolute path as written and with every link resolved: a folder reached through a link
    (the Hugging Face cache's snapshots) holds its files under both."""
    return {os.path.abspath(path), _real(path)}


def _inside(path: str, folder: str) -> bool:
    return any(p.startswith(f.rstrip(os.sep) + os.sep) for p in _spellings(path) for f in _spellings(folder))


def refuse_overwrite(output: str, inputs: Iterable[str], is_dir: bool = False) -> None:
    """Refuse an output that is one of the inputs, however spelled (`./x`, a symlink, a hard link),
    a folder output that holds one, or an output inside an input folder: writing it would destroy
    or change what is being read."""
    for path in inputs:
        same = bool(_spellings(output) & _spellings(path)) or \
            (os.path.exists(output) and os.path.exists(path) and os.path.samefile(output, path))
        if same:
            raise SftoolsError(f"{output}: is the input {path}; write the output somewhere else")
        if (is_dir or os.path.isdir(output)) and _inside(path, output):
            raise SftoolsError(f"{output}: holds the input {path}; write the output somewhere else")
        if os.path.isdir(path) and _inside(output, path):
            raise SftoolsError(f"{output}: lies inside the input folder {path}; write the output somewhere else")


def check_file_name(output: str, suffix: str = OUTPUT_SUFFIX) -> None:
    """Outputs are safetensors files (or GGUF, `suffix` .gguf), and their names say so (so every
    tool agrees what they are)."""
    if not output.endswith(suffix):
        kind = "safetensors" if suffix == OUTPUT_SUFFIX else suffix.lstrip(".").upper()
        raise SftoolsError(f"{output}: output files are {kind}; give a name ending in {suffix}")


def check_destination(dst: str) -> None:
    """Refuse, before any work, a destination file that could not be written."""
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    if not os.path.isdir(parent):
        raise SftoolsError(f"{dst}: folder {parent} does not exist")
    if os.path.isdir(dst):
        raise SftoolsError(f"{dst}: is a folder; give a file name")
    if not os.access(parent, os.W_OK):
        raise SftoolsError(f"{dst}: folder {parent} is not writable")


def check_output_file(output: str, inputs: Iterable[str] = (), suffix: str = OUTPUT_SUFFIX) -> None:
    """Everything an output file must pass before any work: its name, its folder, and not being
    one of `inputs`."""
    refuse_overwrite(output, inputs)
    check_destination(output)
    check_file_name(output, suffix)


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8', 'surrogateescape')):08x}"


def _temp_stem(dst: str) -> str:
    """`.sftools-<crc32 of the name>-<crc32 of this host>`: short whatever the name's length, the
    same for every run on this machine. Only this host's pids can be checked for life, so only its
    temporaries are ever removed (a shared folder may hold another machine's live ones)."""
    return f".sftools-{_crc(os.path.basename(os.path.normpath(dst)))}-{_crc(socket.gethostname())}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(dst: str) -> list[str]:
    """Delete what killed runs to `dst` left beside it (their pid is gone); returns the paths."""
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    removed = []
    for path in glob.glob(os.path.join(glob.escape(parent), _temp_stem(dst) + "-*")):
        pid_text = os.path.basename(path)[len(_temp_stem(dst)) + 1:].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted run: %s", len(removed), ", ".join(removed))
    return removed


@contextlib.contextmanager
def atomic_target(dst: str, is_dir: bool = False, own_names: Iterable[str] = ()) -> Iterator[str]:
    """Yield a temporary path beside `dst`; move it to `dst` only if the block succeeds. An existing
    folder `dst` may hold shards, config.json and `own_names` (sub-folders the caller writes there)."""
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    if is_dir:
        _check_folder_destination(dst, parent, set(own_names))
    else:
        check_destination(dst)
    remove_stale_temporaries(dst)
    tmp = os.path.join(parent, f"{_temp_stem(dst)}-{os.getpid()}.tmp")  # 36 bytes at most beside any name
    try:
        if is_dir:
            os.mkdir(tmp)
        yield tmp
        _replace_dir(tmp, dst) if is_dir else os.replace(tmp, dst)
    except OSError as exc:
        if exc.filename is not None and not str(exc.filename).startswith(tmp) and exc.filename != dst:
            raise  # an input's error, which names its own file
        raise SftoolsError(f"{dst}: {exc.strerror or exc}") from None  # the user's path, not the hidden one
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def _check_folder_destination(dst: str, parent: str, own_names: set[str]) -> None:
    """An output folder may be new, or one holding only files sftools writes there."""
    if not os.path.isdir(parent):
        raise SftoolsError(f"{dst}: folder {parent} does not exist")
    if not os.path.exists(dst):
        return
    if not os.path.isdir(dst):
        raise SftoolsError(f"{dst}: exists and is not a folder")
    foreign = [n for n in os.listdir(dst) if not (n.startswith(SHARD_STEM) or n == "config.json" or n in own_names)]
    if foreign:
        raise SftoolsError(f"{dst}: folder holds other files ({foreign[0]}, ...); choose an empty or new folder")


def _replace_dir(tmp: str, dst: str) -> None:
    """Move the finished folder into place; an existing one is swapped out whole, never mixed
    file by file with the new output."""
    if not os.path.exists(dst):
        os.rename(tmp, dst)
        return
    old = tmp[: -len(".tmp")] + ".old"
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_file(dst: str, tensors: Mapping[str, LazyTensor], metadata: dict[str, str], desc: str = "writing") -> None:
    """One safetensors file, written atomically and verified."""
    write_ordered(dst, plan_order(tensors.items()), metadata, desc)


def write_ordered(dst: str, ordered: list[Named], metadata: dict[str, str], desc: str = "writing") -> None:
    """`write_file` in the caller's order (a tensor can then be produced right after the one it is
    computed with); each tensor must still start at a multiple of its element size."""
    check_file_name(dst)
    _check_alignment(ordered)
    total = sum(t.nbytes for _, t in ordered)
    with atomic_target(dst) as tmp:
        with progress(total, desc) as bar:
            crcs = write_safetensors(tmp, ordered, metadata, on_bytes=bar.update)
        with progress(total, "verifying") as bar:
            verify_safetensors(tmp, crcs, on_bytes=bar.update)


def _check_alignment(ordered: list[Named]) -> None:
    """Readers that map the file view each tensor in place, which needs it aligned (the header is
    padded to 8 bytes, so offsets count from an aligned start)."""
    offset = 0
    for name, t in ordered:
        if offset % t.dtype.itemsize:
            raise SftoolsError(f"tensor {name} would start at byte {offset}, not a multiple of its "
                               f"{t.dtype.itemsize}-byte elements")
        offset += t.nbytes


def write_sharded(
    dst_dir: str,
    tensors: Mapping[str, LazyTensor],
    metadata: dict[str, str],
    max_shard_bytes: int,
    extra_files: dict[str, str] | None = None,
    desc: str = "writing",
) -> list[str]:
    """Shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its own) plus the
    `diffusion_pytorch_model.safetensors.index.json` diffusers reads; one shard gets no index."""
    shards = split_shards(plan_order(tensors.items()), max_shard_bytes)
    n = len(shards)
    names = [f"{SHARD_STEM}.safetensors"] if n == 1 else [
        f"{SHARD_STEM}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
    ]
    total = sum(t.nbytes for t in tensors.values())
    with atomic_target(dst_dir, is_dir=True) as tmp:
        with progress(total, desc) as bar, progress(total, "verifying") as check:
            for name, shard in zip(names, shards):
                path = os.path.join(tmp, name)
                crcs = write_safetensors(path, shard, metadata, on_bytes=bar.update)
                verify_safetensors(path, crcs, on_bytes=check.update)
        if n > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {tname: name for name, shard in zip(names, shards) for tname, _ in shard},
            }
            with open(os.path.join(tmp, f"{SHARD_STEM}.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        for fname, text in (extra_files or {}).items():
            with open(os.path.join(tmp, fname), "w") as f:
                f.write(text)
    return names


def split_shards(tensors: list[Named], limit: int) -> list[list[Named]]:
    shards: list[list[Named]] = [[]]
    size = 0
    for name, t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += t.nbytes
    return shards


def write_text(dst: str, text: str) -> None:
    """A small text output (a JSON report), atomically."""
    with atomic_target(dst) as tmp, open(tmp, "w") as f:
        f.write(text)


