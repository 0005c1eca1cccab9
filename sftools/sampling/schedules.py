"""Few-step flow-matching schedules: which timestep the model sees at each step, and which sigma
turns its flow prediction into x0 and re-noises x0 for the next step.

The grid is the training one of diffusers' `FlowMatchEulerDiscreteScheduler` (1000 steps, shifted
sigma = shift*s / (1 + (shift-1)*s) for s = 1, 0.999, ..., 0.001), which is Self Forcing's
`FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)` grid too.

- warped (Self Forcing's `warp_denoising_step`, and ComfyUI's `simple` scheduler on Wan's
  `ModelSamplingDiscreteFlow`): step i of N sits at grid point s_i = (1000 - floor(1000 i / N)) / 1000,
  so [1000, 750, 500, 250] with shift 5 becomes t = 1000, 937.5, 833.33, 625 and with shift 8 the
  sigmas 1, 0.96, 0.889, 0.727 ComfyUI gives LightX2V's 4-step models;
- unwarped (CausVid's [1000, 757, 522]): the model sees the raw t, and sigma is the grid value nearest
  to it (Self Forcing's `_convert_flow_pred_to_x0` and `add_noise` both look it up that way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

TRAIN_STEPS = 1000


@dataclass(frozen=True)
class Step:
    timestep: float  # what the model's time embedding gets (float32 value)
    sigma: float  # x_t = (1 - sigma) x0 + sigma noise


def training_grid(shift: float) -> torch.Tensor:
    """The 1000 shifted sigmas of training, from 1 down, in float32."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_STEPS, shift=shift).sigmas[:TRAIN_STEPS].float()


def few_step_schedule(steps: int, shift: float, warp: bool = True, step_list: list[float] | None = None) -> list[Step]:
    """`steps` denoising steps (or an explicit `step_list` of raw timesteps in [0, 1000])."""
    grid = training_grid(shift)
    raw = step_list if step_list is not None else [TRAIN_STEPS - (i * TRAIN_STEPS) // steps for i in range(steps)]
    out = []
    for t in raw:
        if warp:
            sigma = grid[TRAIN_STEPS - int(t)] if int(t) > 0 else torch.tensor(0.0)
            timestep = float(sigma * TRAIN_STEPS)
        else:
            sigma = grid[int(torch.argmin((grid * TRAIN_STEPS - float(t)).abs()))]
            timestep = float(t)
        out.append(Step(timestep=timestep, sigma=float(sigma)))
    return out
