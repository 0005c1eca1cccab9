"""Lazy tensors: what a tensor is (dtype, shape) without its bytes, and how to read them.

Every reader returns a `Checkpoint`, a name -> `LazyTensor` map. Renaming, selecting and planning
output files only touch these descriptions; bytes are read one tensor at a time, when a writer or an
extractor asks for them, so peak memory stays near the largest tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

CHUNK_BYTES = 16 * 1024 * 1024


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

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        return self.loader()


@dataclass
class Checkpoint:
    """Named lazy tensors read from one source, plus what the reader noticed on the way."""

    path: str
    format: str
    tensors: dict[str, LazyTensor]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def renamed(self, mapping: dict[str, str], notes: list[str] | None = None) -> "Checkpoint":
        """A view with tensors under new names (`old -> new`); tensors not in the mapping are dropped."""
        tensors = {mapping[k]: v for k, v in self.tensors.items() if k in mapping}
        return Checkpoint(self.path, self.format, tensors, dict(self.metadata), self.notes + (notes or []))


def shared_count(storage_keys) -> int:
    """How many tensors view a storage that another tensor also views (tied weights, views)."""
    return sum(n for n in Counter(storage_keys).values() if n > 1)


def dtype_counts(tensors) -> dict[str, int]:
    """{'bfloat16': 54, ...} for anything with a `.dtype`."""
    return dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors))
