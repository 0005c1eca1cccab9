"""Every random draw of a sampling run, from a seed or from a file.

Seeded noise is drawn per latent frame, each frame from its own generator keyed by (seed, what,
step, frame), so a shorter video's noise is a prefix of a longer one's and the block size does not
change the draws. A `--noise` file gives the draws of another implementation, value by value:
`noise` [1, C, T, h, w] starts block b from frames [b*nf, (b+1)*nf), `renoise` [steps-1, 1, C, T, h, w]
re-noises after step s, sliced to the block's own frames.
"""

from __future__ import annotations

import hashlib

import torch

from sftools.errors import SftoolsError
from sftools.io.sources import open_checkpoint


def keyed_generator(*key) -> torch.Generator:
    """A CPU generator seeded from `key` (seed, what, step, ...): draws that depend on nothing else,
    not on what was drawn before, the device, or the process."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class SeededNoise:
    def __init__(self, seed: int, channels: int, height: int, width: int) -> None:
        self.seed, self.shape = seed, (1, channels, 1, height, width)

    def _frame(self, what: str, step: int, frame: int) -> torch.Tensor:
        return torch.randn(self.shape, generator=keyed_generator(self.seed, what, step, frame))

    def initial(self, start: int, frames: int) -> torch.Tensor:
        return torch.cat([self._frame("noise", 0, f) for f in range(start, start + frames)], dim=2)

    def renoise(self, step: int, start: int, frames: int) -> torch.Tensor:
        return torch.cat([self._frame("renoise", step, f) for f in range(start, start + frames)], dim=2)


class BatchNoise:
    """Several videos' seeded noise, a row each: row i draws exactly what a run with `seeds[i]`
    draws, so a batch of videos is the same as the videos made one at a time."""

    def __init__(self, seeds: list[int], channels: int, height: int, width: int) -> None:
        self.rows = [SeededNoise(seed, channels, height, width) for seed in seeds]

    def initial(self, start: int, frames: int) -> torch.Tensor:
        return torch.cat([row.initial(start, frames) for row in self.rows])

    def renoise(self, step: int, start: int, frames: int) -> torch.Tensor:
        return torch.cat([row.renoise(step, start, frames) for row in self.rows])


class FileNoise:
    def __init__(self, path: str, steps: int, shape: tuple[int, int, int, int, int]) -> None:
        tensors = open_checkpoint(path).tensors
        expected = {"noise": shape, "renoise": (steps - 1, *shape)}
        self.tensors = {}
        for name, want in expected.items():
            if name == "renoise" and steps == 1 and name not in tensors:
                continue
            if name not in tensors:
                raise SftoolsError(f"{path}: has no tensor {name!r} (a noise file holds noise and renoise)")
            lazy = tensors[name]
            if tuple(lazy.shape) != want or lazy.dtype != torch.float32:
                raise SftoolsError(f"{path}: {name} is {lazy.dtype} {list(lazy.shape)}, this run needs float32 {list(want)}")
            self.tensors[name] = lazy.load()

    def initial(self, start: int, frames: int) -> torch.Tensor:
        return self.tensors["noise"][:, :, start:start + frames]

    def renoise(self, step: int, start: int, frames: int) -> torch.Tensor:
        return self.tensors["renoise"][step][:, :, start:start + frames]
