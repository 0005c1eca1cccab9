"""The stages around Self Forcing: the known (synthetic) teacher, ODE-regression initialization on
teacher trajectories, and teacher forcing as the baseline, each checked against an independent
computation or an exact property."""

from __future__ import annotations

import json

import pytest
import torch

from cli_runner import run
from sftools.models.causal_wan import CausalWanModel
from sftools.sampling.schedules import few_step_schedule
from sftools.training.adapters import GENERATOR, adapter_parameters, using
from sftools.training.ode import regression_inputs, teacher_sigmas, trajectory
from sftools.training.rollout import rollout
from sftools.training.synthetic import GaussianVideoLaw, GaussianVideoTeacher, frechet_distance
from test_training import FAST, RECIPE, final
from test_training_core import tiny_model

LAW = GaussianVideoLaw(channels=4, height=2, width=2, text_dim=8, patterns=3, correlation=0.8, scale=1.5, residual=0.2)


def dense_posterior_mean(teacher: GaussianVideoTeacher, x_t, sigma: float, context):
    """E[x0 | x_t] by the textbook formula on the full covariance of one video, no structure used."""
    frames = x_t.shape[2]
    law = teacher.law
    pattern_cov = teacher.basis @ teacher.basis.T  # [D, D]
    time = torch.arange(frames, dtype=torch.float64)
    ar = law.correlation ** (time[:, None] - time[None, :]).abs()
    cov = torch.kron(law.scale ** 2 * ar, pattern_cov) + law.residual ** 2 * torch.eye(frames * law.dim, dtype=torch.float64)
    mean = teacher.mean(context)[0].repeat(frames)
    y = x_t[0].double().permute(1, 0, 2, 3).reshape(-1)
    a = 1 - sigma
    gain = a * cov @ torch.linalg.inv(a * a * cov + sigma ** 2 * torch.eye(len(cov), dtype=torch.float64))
    x0 = mean + gain @ (y - a * mean)
    return x0.reshape(frames, law.channels, law.height, law.width).permute(1, 0, 2, 3)[None]


@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.95])
def test_the_synthetic_teacher_is_the_exact_posterior_mean_of_its_law(sigma):
    teacher = GaussianVideoTeacher(LAW)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 3, LAW.text_dim, generator=g)
    x_t = torch.randn(1, LAW.channels, 5, LAW.height, LAW.width, generator=g, dtype=torch.float64)
    got = teacher.denoise(x_t, torch.tensor([sigma]), context)
    assert torch.allclose(got, dense_posterior_mean(teacher, x_t, sigma, context), atol=1e-10)
    flow = teacher(x_t.float(), torch.tensor([sigma * 1000]), context)[0]
    assert torch.allclose(flow.double(), (x_t - got) / sigma, atol=1e-5)


def test_the_synthetic_teachers_draws_have_its_law_and_its_distance_sees_a_wrong_law():
    teacher = GaussianVideoTeacher(LAW)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(4000, 3, LAW.text_dim, generator=g)
    videos = teacher.sample(context, 4, g)
    coeffs = teacher.coefficients(videos, context)  # [N, T, K]
    lag0 = coeffs[:, 1:].pow(2).mean()
    lag1 = (coeffs[:, 1:] * coeffs[:, :-1]).mean()
    assert abs(float(lag0) - (LAW.scale ** 2 + LAW.residual ** 2)) < 0.1
    assert abs(float(lag1) - LAW.correlation * LAW.scale ** 2) < 0.1
    exact = teacher.frame_distances(videos, context)
    unrelated = videos.clone()  # every other frame from another video: right frames, no motion
    unrelated[:, :, 1::2] = videos.roll(1, dims=0)[:, :, 1::2]
    assert exact.max() < 0.15 and teacher.frame_distances(unrelated, context)[1:].min() > 1.0


def test_frechet_distance_is_the_closed_form_for_gaussians_that_commute():
    mean_a, mean_b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    cov_a, cov_b = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    # W2^2 = |m_a - m_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 5 + 1 + 4
    assert float(frechet_distance(mean_a, cov_a, mean_b, cov_b)) == pytest.approx(10 ** 0.5, abs=1e-12)
    assert float(frechet_distance(mean_a, cov_a, mean_a, cov_a)) == pytest.approx(0.0, abs=1e-7)


def test_teacher_trajectories_are_kept_exactly_at_the_students_noise_levels():
    schedule = few_step_schedule(4, 5.0)
    sigmas = teacher_sigmas(schedule, 48)
    assert sigmas[0] == schedule[0].sigma and sigmas[-1] == 0.0 and len(sigmas) == 49
    assert all(step.sigma in sigmas for step in schedule) and sigmas == sorted(sigmas, reverse=True)
    seen = []

    def flow(x, t):  # a linear flow whose Euler steps are easy to follow by hand
        seen.append(float(t[0]))
        return 0.5 * x

    noise = torch.ones(1, 1, 2, 1, 1)
    states = trajectory(flow, noise, schedule, 8)
    assert states.shape == (5, 1, 1, 2, 1, 1)
    expected, x = [], noise
    for sigma, following in zip(teacher_sigmas(schedule, 8), teacher_sigmas(schedule, 8)[1:]):
        if sigma in {s.sigma for s in schedule}:
            expected.append(x)
        x = x + (following - sigma) * 0.5 * x
    assert torch.equal(states, torch.stack(expected + [x]))
    assert seen[0] == pytest.approx(1000 * schedule[0].sigma)


def test_ode_regression_takes_each_blocks_frames_from_its_own_level():
    schedule = few_step_schedule(4, 5.0)
    states = torch.arange(5.0).view(5, 1, 1, 1, 1, 1).expand(5, 1, 2, 7, 1, 1).clone()  # state k holds value k
    x, timestep, sigma = regression_inputs(states, schedule, torch.tensor([2, 0, 3]), frames_per_block=3)
    assert x[0, 0, :, 0, 0].tolist() == [2, 2, 2, 0, 0, 0, 3]
    assert timestep[0].tolist() == [schedule[k].timestep for k in (2, 2, 2, 0, 0, 0, 3)]
    assert sigma.flatten().tolist() == pytest.approx([schedule[k].sigma for k in (2, 2, 2, 0, 0, 0, 3)])


def test_teacher_forcing_with_the_generators_own_video_is_self_forcing_and_with_another_differs_after_block_one(tmp_path):
    transformer, _ = tiny_model(tmp_path)
    for p in adapter_parameters(transformer, GENERATOR):
        torch.nn.init.normal_(p, std=0.05)
    model = CausalWanModel(transformer)
    context = torch.randn(1, 5, 32)
    args = (model, context, few_step_schedule(4, 5.0), (1, 16, 9, 4, 4), 3, 3)

    def go(truth=None):
        with torch.no_grad(), using(transformer, GENERATOR):
            return rollout(*args, generator=torch.Generator().manual_seed(0), shift=5.0, text_len=512, truth=truth)

    own = go()
    assert torch.equal(go(truth=own), own)
    forced = go(truth=torch.randn(own.shape, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(forced[:, :, :3], own[:, :, :3]) and not torch.allclose(forced[:, :, 3:], own[:, :, 3:])


@pytest.mark.parametrize("stage", ["ode_init", "teacher_forcing"])
def test_the_stages_train_resume_bit_for_bit_and_say_what_they_ran(capsys, tmp_path, stage):
    stage_args = [*FAST, "--set", f"stage={stage}", "--set", "ode.pairs=3", "--set", "ode.teacher_steps=8",
                  "--set", "model.teacher=synthetic", "--set", "optim.guidance=0"]
    straight, half = tmp_path / "straight", tmp_path / "half"
    code, out, err = run(capsys, "train", RECIPE, *stage_args, "--set", "run.steps=4", "--output-dir", str(straight))
    assert code == 0, err
    assert ("ODE regression" in out) == (stage == "ode_init") and ("critic (flow)" in out) == (stage != "ode_init")
    assert sorted(p.name for p in (straight / "cache" / "ode").iterdir()) == [f"pair-0000{i}.safetensors" for i in range(3)]
    assert run(capsys, "train", RECIPE, *stage_args, "--set", "run.steps=2", "--output-dir", str(half))[0] == 0
    code, out, err = run(capsys, "train", RECIPE, *stage_args, "--set", "run.steps=4", "--output-dir", str(half),
                         "--resume", str(half), "--json")
    assert code == 0 and json.loads(out)["resumed_from"] == 2, err
    a, b = final(straight), final(half)
    assert all(torch.equal(a[k], b[k]) for k in a) and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_up" in k)


def test_an_unknown_stage_is_refused_in_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "train", RECIPE, "--set", "stage=diffusion_forcing", "--output-dir", str(tmp_path / "r"))
    assert code == 2 and "stage must be one of self_forcing, ode_init, teacher_forcing" in err
    assert not (tmp_path / "r").exists()
