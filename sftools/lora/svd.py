"""Low-rank factors of a difference matrix: randomized SVD by default, exact for validation.

Randomized: `torch.svd_lowrank` (Halko et al.) with q = rank + oversample columns and `niter`
power iterations, as FastVideo and kohya's PR 2240 do; it costs a few matrix products instead of a
full SVD. Seeded per tensor name, so the same inputs give the same file.

Rank modes:
- fixed: k = min(rank, rows, cols).
- energy: k is the smallest integer >= 1 with sum_{i<=k} s_i^2 >= energy * ||D||_F^2 (the fraction
  of Frobenius energy, i.e. squared norm, kept), capped by --rank. ||D||_F^2 is computed exactly from
  D, so singular values the randomized SVD did not reach count as lost. Unlike kohya's resize
  `sv_fro`, the threshold is the energy fraction itself (not its square root), and no extra 1 is added.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

METHODS = ("randomized", "exact")
RANK_MODES = ("fixed", "energy")


@dataclass
class Factors:
    up: torch.Tensor  # [rows, k] = U sqrt(S)
    down: torch.Tensor  # [k, cols] = sqrt(S) Vh
    singular_values: torch.Tensor  # all computed (exact: every one; randomized: q of them)
    exact: bool


def seed_for(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + seed * 1_000_003) % (2**31)


def factorize(
    delta: torch.Tensor,
    rank: int,
    method: str = "randomized",
    oversample: int = 16,
    niter: int = 4,
    seed: int = 0,
) -> Factors:
    """Top singular triplets of the 2-D fp32 `delta`, at least `rank` of them where it has them."""
    rows, cols = delta.shape
    q = min(rank + oversample, rows, cols)
    if method == "exact" or q >= min(rows, cols):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        exact = True
    else:
        with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
        vh, exact = v.mT, False
    root = s.sqrt()
    return Factors(u * root, root[:, None] * vh, s, exact)


def choose_rank(singular_values: torch.Tensor, total_energy: float, rank: int, mode: str, energy: float) -> int:
    """How many singular values to keep; see the module docstring for the exact convention."""
    cap = min(rank, singular_values.numel())
    if mode == "fixed" or total_energy <= 0:
        return max(1, cap)
    kept = torch.cumsum(singular_values.double() ** 2, 0)
    reaching = torch.nonzero(kept >= energy * total_energy)
    k = int(reaching[0]) + 1 if reaching.numel() else cap
    return max(1, min(k, cap))
