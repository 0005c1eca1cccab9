"""GGUF files through gguf-py (the llama.cpp project's Python package): read lazily, written one
tensor at a time.

Writing: gguf-py's usual `add_tensor` keeps every array until `write_tensors_to_file`. Its
lower-level calls let the header and every tensor's info (name, shape, type, size) go to the file
first (`add_tensor_info`, `write_ti_data_to_file`) and the data follow one tensor at a time
(`write_tensor_data`), so only one source tensor and its quantized bytes are in memory. Each
tensor is quantized by gguf-py and checked against its type's error bound (`quantize.py`) before
it is written; the finished file is read back by gguf-py's GGUFReader (architecture, names, types,
shapes) and every tensor's bytes are compared (CRC32) before it is renamed into place.

Reading: GGUFReader parses the header; a tensor's bytes are read with plain reads when it is asked
for (GGUFReader's arrays are views of one memory map of the whole file, whose touched pages would
stay resident) and dequantized by gguf-py. Shapes follow ComfyUI-GGUF's loader (city96/ComfyUI-GGUF
795e4515 loader.py `get_orig_shape`): the `comfy.gguf.orig_shape.<name>` field if there is one, else
the stored dims reversed (GGUF lists the fastest-varying dimension first).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from sftools.errors import SftoolsError
from sftools.io.lazy import CHUNK_BYTES, Checkpoint, LazyTensor, TensorMismatch
from sftools.io.output import atomic_target, check_file_name, progress
from sftools.io.quantize import gguf_encode
from sftools.io.safetensors_io import file_crc

GGUF_SUFFIX = ".gguf"
ARCH_FIELD = "general.architecture"
ORIG_SHAPE_FIELD = "comfy.gguf.orig_shape."
# GGUF types torch holds as they are; every other type loads dequantized to float32.
TORCH_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.F64: torch.float64,
               Q.I8: torch.int8, Q.I16: torch.int16, Q.I32: torch.int32, Q.I64: torch.int64}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF output: its name, how to produce it, and the type it is stored as."""

    name: str
    source: LazyTensor
    qtype: Q

    @property
    def nbytes(self) -> int:
        return stored_nbytes(self.name, self.source.shape, self.qtype)


def stored_nbytes(name: str, shape: tuple[int, ...], qtype: Q) -> int:
    """Bytes of a tensor stored as `qtype` (blocks run along the last dimension)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block:
        raise SftoolsError(f"tensor {name}: rows of {shape[-1]} values do not split into {qtype.name} blocks of {block}")
    return math.prod(shape) // block * size


def file_nbytes(t: LazyTensor) -> int:
    """Bytes a lazy tensor takes in its file (a GGUF block type's, not the dequantized size)."""
    return t.nbytes if t.stored is None else stored_nbytes("", t.shape, Q[t.stored])


def read_gguf(path: str) -> Checkpoint:
    """A checkpoint of lazy tensors from a GGUF file, its string fields as metadata."""
    reader = _reader(path)
    tensors = {t.name: _lazy(path, t, _shape(path, reader, t)) for t in reader.tensors}
    metadata = {key: field.contents() for key, field in reader.fields.items()
                if field.types == [gguf.GGUFValueType.STRING]}
    quantized = sum(t.stored is not None for t in tensors.values())
    notes = [f"GGUF (architecture {metadata.get(ARCH_FIELD, 'not given')}): {quantized} block-quantized tensors "
             f"read dequantized to float32"] if quantized else []
    return Checkpoint(path, "gguf", tensors, metadata, notes, files=(path,))


def _reader(path: str) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, struct and numpy errors alike for damaged files
        raise SftoolsError(f"{path}: gguf cannot read the file: {exc}") from None


def _shape(path: str, reader: gguf.GGUFReader, t) -> tuple[int, ...]:
    field = reader.get_field(ORIG_SHAPE_FIELD + t.name)
    shape = tuple(int(v) for v in (field.contents() if field else reversed(t.shape.tolist())))
    if math.prod(shape) != t.n_elements:
        raise SftoolsError(f"{path}: tensor {t.name} has shape {list(shape)} in its metadata but {t.n_elements} values")
    return shape


def _lazy(path: str, t, shape: tuple[int, ...]) -> LazyTensor:
    qtype, offset, size, name = t.tensor_type, t.data_offset, t.n_bytes, t.name

    def load() -> torch.Tensor:
        buf = bytearray(size)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            if f.readinto(buf) != size:
                raise SftoolsError(f"{path}: tensor {name} is cut short (truncated file?)")
        if qtype in TORCH_TYPES:
            return torch.frombuffer(buf, dtype=TORCH_TYPES[qtype]).reshape(shape)
        try:
            values = gguf.quants.dequantize(np.frombuffer(buf, dtype=np.uint8), qtype)
        except NotImplementedError:
            raise SftoolsError(f"{path}: tensor {name} is {qtype.name}, which gguf cannot dequantize") from None
        return torch.from_numpy(values).reshape(shape)

    if qtype in TORCH_TYPES:
        return LazyTensor(TORCH_TYPES[qtype], shape, load, storage=(path, name))
    return LazyTensor(torch.float32, shape, load, storage=(path, name), stored=qtype.name)


def write_gguf(dst: str, tensors: list[GGUFTensor], arch: str, file_type: gguf.LlamaFileType,
               metadata: dict[str, str], desc: str = "writing") -> None:
    """One GGUF file, written atomically, one tensor at a time, checked and read back."""
    check_file_name(dst, GGUF_SUFFIX)
    with atomic_target(dst) as tmp:
        crcs = _write(tmp, tensors, arch, file_type, metadata, desc)
        verify_gguf(tmp, tensors, arch, crcs)


def _write(path: str, tensors: list[GGUFTensor], arch: str, file_type: gguf.LlamaFileType,
           metadata: dict[str, str], desc: str) -> list[int]:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    for key, value in metadata.items():
        writer.add_string(key, value)
    for t in tensors:
        # A float32 "source" dtype with raw_dtype: the shape is taken as the tensor's, not its bytes'.
        writer.add_tensor_info(t.name, t.source.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    crcs = []
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress(sum(t.source.nbytes for t in tensors), desc) as bar:
            for t in tensors:
                data = gguf_encode(t.name, _load(t), t.qtype)
                writer.write_tensor_data(data)
                crcs.append(zlib.crc32(data.reshape(-1).view(np.uint8)))
                bar.update(t.source.nbytes)
    finally:
        writer.close()
    return crcs


def _load(t: GGUFTensor) -> torch.Tensor:
    try:
        return t.source.load()
    except TensorMismatch as exc:
        raise SftoolsError(f"tensor {t.name}: {exc}") from None


def verify_gguf(path: str, tensors: list[GGUFTensor], arch: str, crcs: list[int]) -> None:
    """Read `path` back with gguf-py: the architecture, every tensor's name, type and shape as
    ComfyUI-GGUF will see them, and its bytes (CRC32 of what was written)."""
    reader = _reader(path)
    field = reader.get_field(ARCH_FIELD)
    if field is None or field.types != [gguf.GGUFValueType.STRING] or field.contents() != arch:
        raise SftoolsError(f"{path}: reads back without the string field {ARCH_FIELD} = {arch!r}")
    if len(reader.tensors) != len(tensors):
        raise SftoolsError(f"{path}: read back {len(reader.tensors)} tensors, wrote {len(tensors)}")
    buf = bytearray(CHUNK_BYTES)
    with open(path, "rb", buffering=0) as f, progress(sum(t.nbytes for t in tensors), "verifying") as bar:
        for got, want, crc in zip(reader.tensors, tensors, crcs):
            found = (got.name, got.tensor_type, _shape(path, reader, got))
            if found != (want.name, want.qtype, want.source.shape):
                raise SftoolsError(f"{path}: tensor {want.name} reads back as {found[0]} {found[1].name} {list(found[2])}")
            if file_crc(f, got.data_offset, got.n_bytes, buf, bar.update) != crc:
                raise SftoolsError(f"{path}: tensor {want.name} reads back different bytes")
