"""Distribution matching distillation (DMD) and the critic's loss, as Self Forcing computes them.

`model/dmd.py` (guandeh17/Self-Forcing @ 33593df): a timestep t ~ U{0..999} is shifted like the
schedule and clamped to [20, 980]; the generated video is noised to it; the critic (fake score) and
the teacher (real score, with guidance in the form cond + g (cond - uncond)) predict x0; the DMD
gradient is (fake - real) / mean|x - real| per sample, and the loss 0.5 ||x - (x - grad).detach()||^2
(mean) has exactly that gradient over N elements. The critic learns the generator's distribution
with the flow-matching loss: its flow prediction against noise - x.
"""

from __future__ import annotations

import torch

MIN_T, MAX_T = 20.0, 980.0


def critic_timestep(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Self Forcing's t for the scores: uniform integer, shifted, clamped to [20, 980]."""
    s = torch.randint(0, 1000, (batch,), generator=generator).double() / 1000
    return (shift * s / (1 + (shift - 1) * s) * 1000).clamp(MIN_T, MAX_T).float()


def noised(x: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    sigma = (timestep / 1000).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - sigma) * x + sigma * noise


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """(fake - real) / mean|x - real| per sample, NaN-free (Self Forcing's normalization)."""
    scale = (x - real_x0).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.nan_to_num((fake_x0 - real_x0) / scale)


def dmd_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to `x` is dmd_gradient / x.numel()."""
    grad = dmd_gradient(x.detach(), real_x0.detach(), fake_x0.detach())
    return 0.5 * torch.nn.functional.mse_loss(x.double(), (x - grad).double().detach())


def flow_loss(flow: torch.Tensor, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The critic's denoising loss: its flow prediction against noise - x."""
    return torch.nn.functional.mse_loss(flow.float(), (noise - x).float())
