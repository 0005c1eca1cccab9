"""ODE regression, where Self Forcing starts: the causal few-step student learns to jump from the
teacher's trajectory at its few noise levels straight to where the teacher's ODE ends.

Trajectories: `scripts/generate_ode_pairs.py` (guandeh17/Self-Forcing @ 33593df) runs the
bidirectional teacher with 48 Euler steps at shift 8 and keeps the states at t = 1000, 960, 889,
727, while its DMD stage samples at the shift-5 warped 1000, 937.5, 833, 625 (SF issue #64). Here the
teacher's Euler steps are spread inside the student's own intervals, so the states kept are exactly
at the student's noise levels, whatever its steps and shift.

Regression: `model/ode_regression.py` draws one of those levels per block (the same within a
block), builds the input from the matching states, runs one parallel block-causal forward over all
frames, and regresses x0 onto the trajectory's clean end with the MSE.
"""

from __future__ import annotations

from typing import Callable

import torch

from sftools.sampling.schedules import Step

Flow = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, timestep [B]) -> flow


def teacher_sigmas(schedule: list[Step], teacher_steps: int) -> list[float]:
    """The teacher's Euler sigmas, from the student's first to 0: each of the student's intervals
    (its last one ends at 0) split evenly, so every student sigma is one of them."""
    marks = [step.sigma for step in schedule] + [0.0]
    per_interval = -(-teacher_steps // len(schedule))
    sigmas = []
    for high, low in zip(marks, marks[1:]):
        sigmas += [high + (low - high) * i / per_interval for i in range(per_interval)]
    return sigmas + [0.0]


@torch.no_grad()
def trajectory(flow: Flow, noise: torch.Tensor, schedule: list[Step], teacher_steps: int) -> torch.Tensor:
    """[len(schedule) + 1, *noise.shape]: the teacher's Euler trajectory from `noise` at each of the
    student's noise levels, then its clean end."""
    sigmas = teacher_sigmas(schedule, teacher_steps)
    keep = {step.sigma for step in schedule}
    x, states = noise, []
    for sigma, following in zip(sigmas, sigmas[1:]):
        if sigma in keep:
            states.append(x)
        timestep = torch.full((x.shape[0],), sigma * 1000, device=x.device)
        x = x + (following - sigma) * flow(x, timestep)
    return torch.stack(states + [x])


def regression_inputs(states: torch.Tensor, schedule: list[Step], levels: torch.Tensor,
                      frames_per_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [B, C, T, h, w], timestep [B, T], sigma [1, 1, T, 1, 1]): block b's frames taken from the
    trajectory at the student's level `levels[b]`."""
    frames = states.shape[3]
    per_frame = levels.repeat_interleave(frames_per_block)[:frames]
    x = torch.stack([states[int(level), :, :, f] for f, level in enumerate(per_frame)], dim=2)
    timestep = torch.tensor([schedule[int(level)].timestep for level in per_frame], device=x.device)
    sigma = torch.tensor([schedule[int(level)].sigma for level in per_frame], device=x.device, dtype=x.dtype)
    return x, timestep.expand(x.shape[0], frames), sigma.view(1, 1, frames, 1, 1)


def regression_loss(x: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """MSE between the student's x0 (x - sigma flow) and the trajectory's clean end."""
    return torch.nn.functional.mse_loss((x - sigma * flow).float(), clean.float())
