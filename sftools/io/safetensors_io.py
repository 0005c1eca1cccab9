"""Reading safetensors lazily and writing them as a stream.

Reading uses safetensors' own `safe_open` with the `pread` backend: each tensor is read into memory
we own and freed after use, where the default mmap backend would keep every page it touched mapped
(resident) until the file is closed.

Writing is by hand because `safetensors.torch.save_file` needs every tensor in memory at once. The
format is simple (an 8-byte little-endian header length, a JSON header, then the bytes), so the
writer computes the whole header from dtypes and shapes first, then asks for one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from sftools.errors import SftoolsError
from sftools.io.formats import MAX_HEADER
from sftools.io.lazy import CHUNK_BYTES, Checkpoint, LazyTensor, TensorMismatch, nbytes

# The safetensors names of the torch dtypes it can store (safetensors/src/tensor.rs `Dtype`).
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
if hasattr(torch, "float8_e8m0fnu"):
    ST_DTYPES[torch.float8_e8m0fnu] = "F8_E8M0"
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
Named = tuple[str, LazyTensor]  # a tensor of an output file: its final name, and how to produce it


def read_safetensors(path: str) -> Checkpoint:
    """A checkpoint of lazy tensors from one `.safetensors` file."""
    header, _ = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    try:
        handle = safe_open(path, framework="pt", backend="pread")
    except Exception as exc:  # safetensors' own error types: its checks are stricter than ours
        raise SftoolsError(f"{path}: safetensors refuses the file: {exc}") from None
    tensors = {}
    for name, info in header.items():
        dtype = TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise SftoolsError(f"{path}: tensor {name} has dtype {info['dtype']}, which sftools cannot read")
        tensors[name] = LazyTensor(dtype, tuple(info["shape"]), _getter(handle, name), storage=(path, name))
    return Checkpoint(path, "safetensors", tensors, metadata=dict(metadata), files=(path,))


def _getter(handle, name: str) -> Callable[[], torch.Tensor]:
    return lambda: handle.get_tensor(name)


def read_header(path: str) -> tuple[dict, int]:
    """The JSON header and the offset where tensor bytes start, with the format's own checks."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SftoolsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise SftoolsError(f"{path}: not a safetensors file (header length {n} is impossible)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SftoolsError(f"{path}: not a safetensors file (header is not JSON)") from None
    except OSError as exc:
        raise SftoolsError(f"{path}: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise SftoolsError(f"{path}: not a safetensors file (header is not an object)")
    _check_layout(path, header, size - 8 - n)
    return header, 8 + n


def _check_layout(path: str, header: dict, data_len: int) -> None:
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            size = nbytes(TORCH_DTYPES[info["dtype"]], info["shape"])
        except (KeyError, TypeError, ValueError):
            raise SftoolsError(f"{path}: tensor {name} has a malformed header entry") from None
        if end - begin != size:
            raise SftoolsError(f"{path}: tensor {name} spans {end - begin} bytes, its shape needs {size}")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise SftoolsError(f"{path}: tensor {name} does not follow the previous one (offset {begin}, expected {at})")
        at = end
    if at != data_len:
        raise SftoolsError(f"{path}: file holds {data_len} data bytes, header describes {at} (truncated?)")


def plan_order(tensors: Iterable[Named]) -> list[Named]:
    """Largest element size first, then by name, as safetensors orders files, so every tensor is aligned."""
    return sorted(tensors, key=lambda nt: (-nt[1].dtype.itemsize, nt[0]))


def build_header(tensors: list[Named], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, t in tensors:
        if t.dtype not in ST_DTYPES:
            raise SftoolsError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        if name == "__metadata__" or name in header:
            raise SftoolsError(f"tensor name {name!r} is reserved or repeated")
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(
    path: str,
    tensors: list[Named],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Stream `tensors` (already in file order) into `path`; returns a CRC32 of each tensor's bytes.

    The caller owns atomicity (write to a temporary name, rename on success).
    """
    header = build_header(tensors, metadata or {})
    crcs: dict[str, int] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, t in tensors:
            try:
                crcs[name] = _write_streamed(f, t) if t.chunks else _write_whole(f, t)
            except TensorMismatch as exc:
                raise SftoolsError(f"tensor {name}: {exc}") from None
            if on_bytes:
                on_bytes(t.nbytes)
    return crcs


def _write_whole(f, t: LazyTensor) -> int:
    data = tensor_bytes(t.load())
    f.write(data)
    return zlib.crc32(data)


def _write_streamed(f, t: LazyTensor) -> int:
    crc, written = 0, 0
    for piece in t.chunks():
        if piece.dtype != t.dtype:
            raise TensorMismatch(f"produced {piece.dtype}, declared {t.dtype}")
        data = tensor_bytes(piece)
        crc = zlib.crc32(data, crc)
        f.write(data)
        written += len(data)
    if written != t.nbytes:
        raise TensorMismatch(f"produced {written} bytes, declared {t.nbytes}")
    return crc


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def verify_safetensors(path: str, crcs: dict[str, int], on_bytes: Callable[[int], None] | None = None) -> None:
    """Check `path` with safetensors' own reader, then re-read every tensor's bytes and compare.

    The bytes are re-read in pieces into one reused buffer: fresh allocations per tensor cost more
    than the reading itself (page faults), and the output can be larger than memory.
    """
    try:
        with safe_open(path, framework="pt", backend="pread") as f:
            names = set(f.keys())
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise SftoolsError(f"{path}: safetensors cannot read the written file back: {exc}") from None
    if names != set(crcs):
        raise SftoolsError(f"{path}: read back {len(names)} tensors, wrote {len(crcs)}")
    header, start = read_header(path)
    buf = bytearray(CHUNK_BYTES)
    with open(path, "rb", buffering=0) as f:
        for name, expected in crcs.items():
            begin, end = header[name]["data_offsets"]
            if file_crc(f, start + begin, end - begin, buf, on_bytes) != expected:
                raise SftoolsError(f"{path}: tensor {name} reads back different bytes")


def file_crc(f, offset: int, size: int, buf: bytearray, on_bytes: Callable[[int], None] | None = None) -> int:
    """CRC32 of `size` bytes of the unbuffered file `f` from `offset`, read in pieces into `buf`."""
    f.seek(offset)
    crc = 0
    for at in range(0, size, len(buf)):
        n = f.readinto(memoryview(buf)[: min(len(buf), size - at)])
        if not n:
            break  # a short file: the CRC then differs
        crc = zlib.crc32(memoryview(buf)[:n], crc)
        if on_bytes:
            on_bytes(n)
    return crc
