"""Reading torch's pickled checkpoints (`.pt`, `.pth`, `.ckpt`, `.bin`) without running them.

Dispatch follows `torch.load`: a file starting with `PK\\x03\\x04` is the zip format (>= 1.6);
otherwise it is the legacy stream of five pickles followed by raw storages. The pickles run on the
symbolic machine in `pickle_vm`; tensors become `LazyTensor`s that read their bytes from the file
only when asked, after their extent has been checked against the storage that holds them.
"""

from __future__ import annotations

import math
import os
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from sftools.errors import SftoolsError, UnsafeCheckpoint
from sftools.io.lazy import CHUNK_BYTES, Checkpoint, LazyTensor
from sftools.io.pickle_vm import (
    MAX_DIM,
    PLAIN_KEYS,
    STORAGE_DTYPES,
    Call,
    Global,
    Opaque,
    PickleError,
    StorageRef,
    TensorRef,
    bounded_summary,
    is_allowed,
    refusal_reason,
    run_pickle,
)
from sftools.io.zip_reader import ZipError, check_stored, read_zip_entries

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
NEST = "/"  # joins nested dict keys; dots stay part of the state-dict names
# A view (stride 0, `expand`) may describe more bytes than its storage holds; past this multiple of
# the file size (and 1 GiB) it is a memory bomb, not a weight.
MAX_EXPANSION = 4


@dataclass
class PickleScan:
    """What a pickled checkpoint holds and whether it is safe to read; built without executing it."""

    path: str
    format: str = "unknown"
    globals: list[Global] = field(default_factory=list)
    opcodes: set[str] = field(default_factory=set)
    refusals: list[str] = field(default_factory=list)
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> what it was
    storage_offsets: dict[str, int] = field(default_factory=dict)  # storage key -> file offset

    @property
    def safe(self) -> bool:
        return not self.refusals

    def refuse(self, reason: str) -> None:
        if reason not in self.refusals:
            self.refusals.append(reason)


def scan_pickle(path: str) -> PickleScan:
    """Parse a pickled checkpoint fully and symbolically. Never raises for hostile content."""
    scan = PickleScan(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        if head[:4] == b"PK\x03\x04":
            _scan_zip(path, scan)
        elif _is_tar(path):
            scan.format = "torch-legacy-tar"
            scan.refuse("legacy tar checkpoint format (torch < 0.1.10) is not supported")
        else:
            _scan_legacy(path, scan)
    except (PickleError, ZipError) as exc:
        scan.refuse(str(exc))
    except (RecursionError, MemoryError):
        scan.refuse("pickle structure too deep or too large to describe")
    except OSError as exc:
        raise SftoolsError(f"{path}: {exc.strerror or exc}") from None
    for g in scan.globals:
        if not is_allowed(g):
            scan.refuse(refusal_reason(g))
    if scan.safe:
        _check_tensors(scan)
    return scan


def _is_tar(path: str) -> bool:
    """Whether torch.load would read this as the pre-0.1.10 tar format: it tries `tarfile` on every
    non-zip file before the pickle stream, and tarfile also accepts V7 headers without "ustar".
    Opening only parses headers; nothing is extracted."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False


def _scan_zip(path: str, scan: PickleScan) -> None:
    scan.format = "torch-zip"
    entries = read_zip_entries(path)
    if not entries:
        raise ZipError("zip archive has no records")
    root = next(iter(entries)).split("/", 1)[0]
    if any(not name.startswith(root + "/") for name in entries):
        raise ZipError("zip records do not share one root folder")
    records = {name[len(root) + 1 :]: entry for name, entry in entries.items()}
    torchscript = "constants.pkl" in records or any(n.startswith("code/") for n in records)
    if torchscript:
        scan.format = "torchscript"
        scan.refuse("TorchScript archive (holds code; torch.jit.load would run it)")
    check_stored(entries)
    if "data.pkl" not in records:
        raise ZipError("zip archive has no data.pkl record")
    byteorder = records.get("byteorder")
    if byteorder is not None:
        with open(path, "rb") as f:
            f.seek(byteorder.data_offset)
            if f.read(byteorder.size).strip() != b"little":
                scan.refuse("big-endian checkpoint (byteorder record is not 'little')")

    storages: dict[str, StorageRef] = {}

    def persistent_load(pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PickleError(f"unexpected persistent id ({bounded_summary(pid)})")
        _, stype, key, location, numel = pid
        dtype, itemsize = _storage_dtype(stype)
        if not isinstance(key, str) or type(numel) is not int or not 0 <= numel < MAX_DIM:
            raise PickleError("malformed storage persistent id")
        record = records.get(f"data/{key}")
        if record is None:
            raise PickleError(f"storage {key} has no data/{key} record")
        nbytes = numel * itemsize
        if record.size != nbytes:
            raise PickleError(f"storage {key} declares {nbytes} bytes but its record holds {record.size}")
        ref = StorageRef(key, dtype, nbytes, str(location))
        if storages.setdefault(key, ref).dtype != dtype:
            raise PickleError(f"storage {key} is used with two dtypes")
        scan.storage_offsets[key] = record.data_offset
        return ref

    with open(path, "rb") as f:
        f.seek(records["data.pkl"].data_offset)
        end = records["data.pkl"].data_offset + records["data.pkl"].size
        result = run_pickle(f, persistent_load, scan.globals.append)
        if result.end > end:
            raise PickleError("data.pkl pickle runs past its zip record")
    scan.opcodes |= result.opcodes
    _flatten(result.value, scan)


def _scan_legacy(path: str, scan: PickleScan) -> None:
    file_size = os.path.getsize(path)
    storages: dict[str, StorageRef] = {}
    with open(path, "rb") as f:
        first = run_pickle(f, None, scan.globals.append)
        scan.opcodes |= first.opcodes
        if first.value != LEGACY_MAGIC:
            scan.format = "pickle"
            _flatten(first.value, scan)
            scan.refuse("plain pickle, not a torch checkpoint (no torch magic number)")
            return
        scan.format = "torch-legacy"
        if run_pickle(f).value != LEGACY_PROTOCOL:
            raise PickleError("unsupported legacy protocol version")
        sys_info = run_pickle(f).value
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            scan.refuse("big-endian legacy checkpoint")

        def persistent_load(pid: Any) -> StorageRef:
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
                raise PickleError(f"unexpected persistent id ({bounded_summary(pid)})")
            _, stype, root_key, location, numel, view = pid
            dtype, itemsize = _storage_dtype(stype)
            if not isinstance(root_key, str) or type(numel) is not int or not 0 <= numel < MAX_DIM:
                raise PickleError("malformed storage persistent id")
            root = StorageRef(root_key, dtype, numel * itemsize, str(location))
            if storages.setdefault(root_key, root) != root:
                raise PickleError(f"storage {root_key} is declared twice with different types or sizes")
            if view is None:
                return root
            if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])
                    and 0 <= view[1] <= numel):
                raise PickleError(f"malformed view of storage {root_key} (offset outside the storage)")
            return StorageRef(root_key, dtype, root.nbytes, root.location, base_offset=view[1])

        obj = run_pickle(f, persistent_load, scan.globals.append)
        scan.opcodes |= obj.opcodes
        keys = run_pickle(f).value
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise PickleError("legacy storage key list is malformed")
        offset = f.tell()
        for key in keys:
            if key not in storages:
                raise PickleError(f"storage {key} has data but no tensor refers to it")
            f.seek(offset)
            count_bytes = f.read(8)
            if len(count_bytes) != 8:
                raise PickleError(f"storage {key} record is truncated")
            (count,) = struct.unpack("<q", count_bytes)
            nbytes = count * storages[key].dtype.itemsize
            if nbytes != storages[key].nbytes:
                raise PickleError(f"storage {key} declares {storages[key].nbytes} bytes but its record holds {nbytes}")
            scan.storage_offsets[key] = offset + 8
            offset += 8 + nbytes
            if offset > file_size:
                raise PickleError(f"storage {key} runs past the end of the file (truncated)")
        if missing := set(storages) - set(keys):
            raise PickleError(f"storage {sorted(missing)[0]} is referenced but has no data record")
    _flatten(obj.value, scan)


def _storage_dtype(stype: Any) -> tuple[torch.dtype, int]:
    """The dtype of a persistent-id storage class and the byte size its numel counts in."""
    if isinstance(stype, Global):
        if stype.module in ("torch", "torch.cuda") and stype.name in STORAGE_DTYPES:
            dtype = STORAGE_DTYPES[stype.name]
            return dtype, dtype.itemsize
        if (stype.module, stype.name) == ("torch.storage", "UntypedStorage"):
            return torch.uint8, 1
    raise PickleError(f"unsupported storage type {stype}")


def _flatten(root: Any, scan: PickleScan) -> None:
    """Record every tensor under its nested path. Iterative, and each container is walked once:
    hostile pickles can nest deeply, contain themselves, or share one sub-list exponentially often."""
    visited: set[int] = set()
    todo: list[tuple[tuple[str, ...], Any]] = [((), root)]
    while todo:
        path, value = todo.pop()
        name = NEST.join(path) or "<root>"
        if isinstance(value, (dict, list, tuple)):
            if id(value) in visited:
                scan.skipped[name] = "reference to a container already read"
                continue
            visited.add(id(value))
        if isinstance(value, TensorRef):
            if name in scan.tensors:  # {1: a, "1": b}, or a key holding "/" beside a sub-dict
                scan.refuse(f"two entries are both named {name!r}; no tensor may be lost silently")
            scan.tensors[name] = value
        elif isinstance(value, dict):
            items = [(str(k) if type(k) in PLAIN_KEYS else f"<{type(k).__name__}>", v) for k, v in value.items()]
            todo.extend((path + (k,), v) for k, v in reversed(items))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (TensorRef, dict, list)) for v in value):
            todo.extend((path + (str(i),), v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, Opaque):
            scan.skipped[name] = value.what
        elif isinstance(value, Call):
            scan.skipped[name] = f"call of {value.func}"
        else:
            scan.skipped[name] = type(value).__name__


def _check_tensors(scan: PickleScan) -> None:
    file_size = os.path.getsize(scan.path)
    dtypes: dict[str, torch.dtype] = {}
    for name, ref in scan.tensors.items():
        if any(s < 0 for s in ref.shape):
            scan.refuse(f"tensor {name} has a negative size")
            continue
        reach = _reach_bytes(ref)
        if ref.nbytes > max(MAX_EXPANSION * file_size, 2**30):
            scan.refuse(f"tensor {name} would expand its {ref.storage.nbytes}-byte storage to {ref.nbytes} bytes")
        if reach > ref.storage.nbytes:
            scan.refuse(f"tensor {name} reaches byte {reach} of storage {ref.storage.key}, which holds {ref.storage.nbytes}")
        if ref.storage.dtype != torch.uint8 and ref.dtype != ref.storage.dtype:
            scan.refuse(f"tensor {name} has dtype {ref.dtype} but its storage holds {ref.storage.dtype}")
        if dtypes.setdefault(ref.storage.key, ref.dtype) != ref.dtype:
            scan.refuse(f"storage {ref.storage.key} is viewed as two dtypes")


def _reach_bytes(ref: TensorRef) -> int:
    """One past the last byte of the storage that the view touches (0 for an empty tensor)."""
    if math.prod(ref.shape) == 0:
        return 0
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    return (last + 1) * ref.dtype.itemsize


def read_pickle_checkpoint(path: str) -> Checkpoint:
    """A checkpoint of lazy tensors from a pickled file, or `UnsafeCheckpoint` naming the reason."""
    scan = scan_pickle(path)
    if not scan.safe:
        raise UnsafeCheckpoint(f"{path}: refused: {scan.refusals[0]}")
    tensors = {name: _lazy(path, scan.storage_offsets[ref.storage.key], ref) for name, ref in scan.tensors.items()}
    notes = [f"skipped non-tensor entry {name!r} ({what})" for name, what in scan.skipped.items()]
    return Checkpoint(path, scan.format, tensors, notes=notes, files=(path,))


def _lazy(path: str, storage_offset: int, ref: TensorRef) -> LazyTensor:
    itemsize = ref.dtype.itemsize
    start = storage_offset + ref.offset * itemsize
    length = _reach_bytes(ref) - ref.offset * itemsize

    def load() -> torch.Tensor:
        if length <= 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        flat = torch.empty(length, dtype=torch.uint8)  # uninitialised: readinto fills every byte
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            _read_exact(f, memoryview(flat.numpy()), f"{path}: storage {ref.storage.key} is truncated")
        flat = flat.view(ref.dtype)
        view = flat.as_strided(ref.shape, ref.stride)
        return view if view.is_contiguous() else view.contiguous()

    def chunks() -> Iterator[torch.Tensor]:
        step = max(itemsize, CHUNK_BYTES - CHUNK_BYTES % itemsize)
        buf = torch.empty(min(step, length), dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            for done in range(0, length, step):
                piece = memoryview(buf.numpy())[: min(step, length - done)]
                _read_exact(f, piece, f"{path}: storage {ref.storage.key} is truncated")
                yield buf[: len(piece)].view(ref.dtype)

    contiguous = ref.stride == _c_strides(ref.shape) and length == ref.nbytes
    return LazyTensor(ref.dtype, ref.shape, load, storage=(ref.storage.key, ref.offset, ref.shape, ref.stride),
                      chunks=chunks if contiguous and length > 0 else None)


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _read_exact(f, buf: memoryview, error: str) -> None:
    """Fill `buf` from `f`; a single read returns at most ~2 GB on Linux, so loop."""
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise SftoolsError(error)
        done += n
