"""Low-rank factors of a difference matrix: randomized SVD by default, exact for validation.

Randomized: `torch.svd_lowrank` (Halko et al.) with q = rank + oversample columns and `niter`
power iterations, as FastVideo and kohya's PR 2240 do; it costs a few matrix products instead of a
full SVD. Seeded per tensor name, so the same inputs give the same file.

How many are kept is a `settings.RankRule`; in energy mode ||D||_F^2 is computed exactly from D, so
singular values the randomized SVD did not reach count as lost.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from sftools.lora.settings import RankRule, SvdSettings


@dataclass
class Factors:
    up: torch.Tensor  # [rows, k] = U sqrt(S)
    down: torch.Tensor  # [k, cols] = sqrt(S) Vh
    singular_values: torch.Tensor  # all computed (exact: every one; randomized: q of them)
    exact: bool


def seed_for(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + seed * 1_000_003) % (2**31)


def factorize(delta: torch.Tensor, rank: int, svd: SvdSettings, name: str) -> Factors:
    """Top singular triplets of the 2-D fp32 `delta`, at least `rank` of them where it has them;
    the randomized path is seeded from `name` and the settings' seed."""
    rows, cols = delta.shape
    q = min(rank + svd.oversample, rows, cols)
    if svd.method == "exact" or q >= min(rows, cols):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        exact = True
    else:
        with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):
            torch.manual_seed(seed_for(name, svd.seed))
            u, s, v = torch.svd_lowrank(delta, q=q, niter=svd.niter)
        vh, exact = v.mT, False
    root = s.sqrt()
    return Factors(u * root, root[:, None] * vh, s, exact)


def choose_rank(rule: RankRule, singular_values: torch.Tensor, total_energy: float) -> int:
    """How many singular values to keep under `rule` (see `RankRule` for the exact convention)."""
    cap = min(rule.rank or singular_values.numel(), singular_values.numel())
    if rule.mode == "fixed" or total_energy <= 0:
        return max(1, cap)
    kept = torch.cumsum(singular_values.double() ** 2, 0)
    reaching = torch.nonzero(kept >= rule.energy * total_energy)
    k = int(reaching[0]) + 1 if reaching.numel() else cap
    return max(1, min(k, cap))
