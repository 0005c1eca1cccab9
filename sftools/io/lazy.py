"""Lazy tensors: what a tensor is (dtype, shape) without its bytes, and how to produce them.

Every reader returns a `Checkpoint`, a name -> `LazyTensor` map, and every writer takes one.
Renaming, selecting, casting and planning output files only touch these descriptions; bytes are
produced one tensor at a time, when a writer or an extractor asks, so peak memory stays near the
largest tensor. `map` derives a new lazy tensor and checks that what it produces is what it
declared (gguf-py's lazy tensors work the same way), so a file's header, written before any byte,
never disagrees with its data.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from sftools.errors import SftoolsError

CHUNK_BYTES = 16 * 1024 * 1024
# Floats a cast may touch; integers, bools and fp8 codes keep their dtype.
CASTABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    """Bytes of a dense tensor: the one place sizes are computed."""
    return math.prod(shape) * dtype.itemsize


class TensorMismatch(SftoolsError):
    """A lazy tensor produced another dtype or shape than it declared."""


@dataclass(frozen=True)
class LazyTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    # Identifies the bytes behind the tensor (storage key, byte offset) so aliases can be reported.
    storage: tuple | None = field(default=None, compare=False)
    # For tensors stored contiguously: yields the flat tensor in pieces read into one reused buffer
    # (each piece is valid until the next is asked for), so copying never touches fresh memory.
    chunks: Callable[[], Iterator[torch.Tensor]] | None = field(default=None, repr=False, compare=False)
    # The file's own type when torch has none for it (a GGUF block type such as "Q8_0"); the tensor
    # then loads dequantized, as `dtype`. Reports count this name, so they say what the file holds.
    stored: str | None = field(default=None, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    def load(self) -> torch.Tensor:
        """The tensor, checked against the declared dtype and shape."""
        value = self.loader()
        if value.dtype != self.dtype or tuple(value.shape) != self.shape:
            raise TensorMismatch(f"produced {value.dtype} {list(value.shape)}, declared {self.dtype} {list(self.shape)}")
        return value

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None,
            shape: tuple[int, ...] | None = None) -> "LazyTensor":
        """A lazy `fn(self)` declared as `dtype` and `shape` (default: unchanged); checked on load."""
        return LazyTensor(dtype or self.dtype, tuple(self.shape if shape is None else shape),
                          lambda: fn(self.load()), storage=self.storage)

    def cast(self, dtype: torch.dtype) -> "LazyTensor":
        """The tensor in `dtype`; contiguous sources stay streamable, cast piece by piece into one
        reused buffer so casting never faults fresh pages."""
        if dtype == self.dtype:
            return self
        source_chunks = self.chunks

        def chunks() -> Iterator[torch.Tensor]:
            out = None
            for piece in source_chunks():
                if out is None or out.numel() < piece.numel():
                    out = torch.empty(piece.numel(), dtype=dtype)
                yield out[: piece.numel()].copy_(piece)

        return LazyTensor(dtype, self.shape, lambda: self.load().to(dtype), storage=self.storage,
                          chunks=chunks if source_chunks else None)

    @classmethod
    def of(cls, value: torch.Tensor) -> "LazyTensor":
        """A tensor already in memory, as a lazy one (for writers)."""
        return cls(value.dtype, tuple(value.shape), lambda: value)


@dataclass
class Checkpoint:
    """Named lazy tensors read from one source, plus what the reader noticed on the way."""

    path: str
    format: str
    tensors: dict[str, LazyTensor]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: tuple[str, ...] = ()  # every file the tensors are read from, so outputs never overwrite one

    def replace(self, tensors: dict[str, LazyTensor], notes: list[str] | None = None) -> "Checkpoint":
        """The same source with other tensors (renamed, selected, dequantized) and more notes."""
        return Checkpoint(self.path, self.format, tensors, dict(self.metadata), self.notes + (notes or []), self.files)

    def renamed(self, mapping: dict[str, str], notes: list[str] | None = None) -> "Checkpoint":
        """A view with tensors under new names (`old -> new`); tensors not in the mapping are dropped."""
        return self.replace({mapping[k]: v for k, v in self.tensors.items() if k in mapping}, notes)

    def cast(self, dtype: torch.dtype | None) -> "Checkpoint":
        """Floats of 16 bits or more in `dtype` (None keeps every dtype)."""
        if dtype is None:
            return self
        return self.replace({n: t.cast(dtype) if t.dtype in CASTABLE else t for n, t in self.tensors.items()})


def shared_count(storage_keys) -> int:
    """How many tensors view a storage that another tensor also views (tied weights, views)."""
    return sum(n for n in Counter(storage_keys).values() if n > 1)


def dtype_counts(tensors) -> dict[str, int]:
    """{'bfloat16': 54, 'Q8_0': 240, ...} for anything with a `.dtype` (a lazy tensor's `stored` type first)."""
    return dict(Counter(getattr(t, "stored", None) or str(t.dtype).removeprefix("torch.") for t in tensors))
